"""The shipped EN->DE model exported to the HF format and decoded by transformers' generate, and
exported to CTranslate2 and decoded by its Translator: the same BLEU as aiayn on test_2016_flickr,
where each runs the same search, and CT2's speed against aiayn's on the same model.

    python benchmarks/export_bleu.py                 # 1000 sentences: greedy and beam 4, HF and CT2
    python benchmarks/export_bleu.py --quick         # the first 100
    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/export_bleu.py --peers ct2   # CT2 only

`aiayn export hf` writes the model as a MarianMTModel. aiayn's models read sources without a final
</s>; transformers' MarianTokenizer appends one, so HF is run twice: on aiayn's own source ids (the
model's inputs as trained) and on MarianTokenizer's. Length penalties differ: aiayn's alpha is GNMT's
((5 + |Y|) / 6) ** alpha, HF's length_penalty divides by |Y| ** length_penalty (|Y| counting </s> in
both); at 0 both rank by log-probability, so the beam rows use alpha = length_penalty = 0 and HF's
early_stopping=True (aiayn's rule: a sentence ends with beam-size finished hypotheses). The last rows
give each the model's own penalty (its recorded alpha, which `aiayn evaluate` uses), a different
search in each.

CTranslate2 (`aiayn export ct2`, float32 and int8 weights) against aiayn's inference copies (fp32,
and bf16 where this CPU computes it: oneDNN linears; int8: dynamically quantized linears): both
decode the same length-sorted batches of --batch sentences on one thread, and the rate is target
tokens (EOS not counted) per second of the process's CPU time. CT2's length_penalty divides by |Y| ** penalty; at 0 it also stops a sentence as
soon as its best beam ends, where aiayn waits for beam-size finished hypotheses (CT2's rule under any
non-zero penalty), so the "penalty 0" beam rows give CT2 a penalty of 1e-9: the same search as aiayn's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from aiayn import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", default="hf,ct2", help="hf (transformers' generate), ct2 (CTranslate2), or both")
    p.add_argument("--rounds", type=int, default=1,
                   help="ct2: time each engine this many times, in turn, and keep its best (this host's speed drifts)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    n = 100 if args.quick else args.sentences
    torch.set_num_threads(args.threads)

    from aiayn.checkpoint import load_model_dir
    from aiayn.data.corpus import ASSETS, multi30k

    pairs = multi30k("test_2016_flickr", "en", "de")[:n]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    model, tok, task, extra = load_model_dir(ASSETS / "models" / "en-de")
    peers = args.peers.split(",")
    print(bench.header("The shipped EN->DE model: aiayn vs its exports, decoded by "
                       + " and ".join({"hf": "transformers' generate", "ct2": "CTranslate2"}[x] for x in peers)))
    print(f"test_2016_flickr, {n} sentences, batches of {args.batch}, {args.threads} thread(s); sacreBLEU")
    if "hf" in peers:
        hf_table(model, tok, task, extra, sources, refs, args)
    if "ct2" in peers:
        ct2_table(model, tok, task, extra, sources, refs, args)
    return 0


def hf_table(model, tok, task, extra, sources, refs, args) -> None:
    from transformers import MarianMTModel, MarianTokenizer

    from aiayn.data.batching import pad
    from aiayn.evaluate import bleu
    from aiayn.interop import export_hf
    from aiayn.translate import translate

    n, rows = len(sources), []
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tok, task, Path(tmp), extra)
        hf = MarianMTModel.from_pretrained(tmp).eval()
        ht = MarianTokenizer.from_pretrained(tmp)

        def hf_run(beam: int, lp: float, marian_tokenizer: bool) -> tuple[list[str], float]:
            out, t0 = [None] * n, time.perf_counter()
            order = sorted(range(n), key=lambda i: len(tok.encode(sources[i])))
            for k in range(0, n, args.batch):
                idx = order[k:k + args.batch]
                if marian_tokenizer:
                    enc = ht([sources[i] for i in idx], return_tensors="pt", padding=True)
                    ids, mask = enc.input_ids, enc.attention_mask
                else:
                    ids = pad([tok.encode(sources[i]) for i in idx], tok.pad_id)
                    mask = (ids != tok.pad_id).long()
                with torch.inference_mode():
                    gen = hf.generate(input_ids=ids, attention_mask=mask, num_beams=beam, do_sample=False,
                                      length_penalty=lp, early_stopping=True,
                                      max_new_tokens=int(mask.sum(1).max()) + 50)
                for i, row in zip(idx, gen.tolist()):
                    out[i] = tok.decode(row[1:])
            return out, time.perf_counter() - t0

        for beam, alpha in ((1, 0.0), (4, 0.0), (4, float(extra.get("alpha", 0.6)))):
            search = "greedy" if beam == 1 else f"beam {beam}, penalty {alpha}"
            t0 = time.perf_counter()
            ours = translate(model, tok, sources, beam=beam, alpha=alpha, workers=1)
            rows.append([search, "aiayn translate (fp32 inference copy)", f"{bleu(ours, refs).score:.2f}",
                         f"{time.perf_counter() - t0:.1f}", ""])
            for marian_tokenizer in (False, True):
                hyps, seconds = hf_run(beam, alpha, marian_tokenizer)
                same = sum(a == b for a, b in zip(hyps, ours))
                name = "HF generate, " + ("MarianTokenizer's sources (+</s>)" if marian_tokenizer
                                          else "aiayn's source ids")
                rows.append([search, name, f"{bleu(hyps, refs).score:.2f}", f"{seconds:.1f}", f"{same}/{n}"])
    print()
    print(bench.table(["search", "decoder", "BLEU", "seconds", "same output as aiayn"], rows))


def ct2_table(model, tok, task, extra, sources, refs, args) -> None:
    """aiayn fp32 / bf16 (where this CPU has it: CTranslate2 has no bf16 on a CPU) / int8 and CTranslate2
    float32 / int8 on the same batches: CPU-time tok/s, BLEU."""
    import ctranslate2

    from aiayn.data.batching import pad
    from aiayn.decode import beam_search, greedy
    from aiayn.evaluate import bleu
    from aiayn.fast.inference import inference_model
    from aiayn.interop import export_ct2
    from aiayn.memory import keep_freed_memory

    keep_freed_memory()  # as aiayn's CLI runs (process-wide: CTranslate2's engines here run under it too)
    ids = [tok.encode(s) for s in sources]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[k:k + args.batch] for k in range(0, len(order), args.batch)]
    alpha = float(extra.get("alpha", 0.6))
    searches = [(1, 0.0, 0.0), (4, 0.0, 1e-9), (4, alpha, alpha)]  # (beam, aiayn's alpha, CT2's length_penalty)

    def aiayn_run(fast, beam: int, a: float) -> list[list[int]]:
        out = [None] * len(ids)
        with torch.inference_mode():
            for idx in batches:
                src = pad([ids[i] for i in idx], tok.pad_id)
                hyps = (greedy(fast, src, tok.bos_id, tok.eos_id) if beam == 1 else
                        [h[0][0] for h in beam_search(fast, src, tok.bos_id, tok.eos_id, beam_size=beam, alpha=a)])
                for i, h in zip(idx, hyps):
                    out[i] = h
        return out

    def ct2_run(translator, beam: int, lp: float) -> list[list[int]]:
        out = [None] * len(ids)
        for idx in batches:
            res = translator.translate_batch([tok.pieces(ids[i]) for i in idx], beam_size=beam, length_penalty=lp,
                                             max_decoding_length=min(max(len(ids[i]) for i in idx) + 50,
                                                                     model.cfg.max_len - 1),
                                             min_decoding_length=0)
            for i, r in zip(idx, res):
                out[i] = [tok.sp.piece_to_id(p) for p in r.hypotheses[0]]
        return out

    engines = {f"aiayn {precision}": ("aiayn", inference_model(model, precision))
               for precision in ("fp32", "bf16", "int8") if bench.lacks(precision) is None}
    with tempfile.TemporaryDirectory() as tmp:
        for ct2_type in ("float32", "int8"):
            out = Path(tmp) / ct2_type
            out.mkdir()
            t0 = time.perf_counter()
            export_ct2(model, tok, task, out, quantization=ct2_type)
            print(f"aiayn export ct2 --quantization {ct2_type}: {time.perf_counter() - t0:.1f} s")
            engines[f"CTranslate2 {ct2_type}"] = ("ct2", ctranslate2.Translator(
                str(out), device="cpu", compute_type=ct2_type, inter_threads=1, intra_threads=args.threads))
        rows = []
        for beam, a, lp in searches:
            search = "greedy" if beam == 1 else f"beam {beam}, aiayn alpha {a:g} / CT2 length_penalty {lp:g}"
            runs = {name: ((lambda e=engine: aiayn_run(e, beam, a)) if kind == "aiayn" else
                           (lambda e=engine: ct2_run(e, beam, lp))) for name, (kind, engine) in engines.items()}
            best, outputs = {}, {}
            for name, run in runs.items():
                run()  # warm-up: oneDNN primitives, CT2's packed weights
            for _ in range(args.rounds):  # the engines in turn, each round: drift hits them alike
                for name, run in runs.items():
                    t0 = time.process_time()
                    outputs[name] = run()
                    best[name] = min(best.get(name, float("inf")), time.process_time() - t0)
            reference = None
            for name in engines:
                hyps, seconds = outputs[name], best[name]
                reference = reference or hyps  # aiayn fp32's outputs
                same = sum(h == r for h, r in zip(hyps, reference))
                tokens = sum(len(h) for h in hyps)
                rows.append([search, name, bench.fmt(tokens / seconds), f"{seconds:.1f}",
                             f"{bleu([tok.decode(h) for h in hyps], refs).score:.2f}", f"{same}/{len(ids)}"])
    print()
    print(bench.table(["search", "engine", "target tok/s (CPU)", "CPU seconds", "BLEU", "same output as aiayn fp32"],
                      rows))


if __name__ == "__main__":
    raise SystemExit(main())
