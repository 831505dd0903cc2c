"""An imported OPUS-MT-shaped model decoded by aiayn, HF generate and CTranslate2, in one run.

    python benchmarks/import_opus.py                      # 128 sentences, greedy and beam 4
    python benchmarks/import_opus.py --quick              # a tiny model: checks that it runs

One MarianMTModel of OPUS-MT's shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, swish, vocabulary
58,101 with <pad> last, scaled and tied embeddings, a final_logits_bias; random weights) is saved
once as an HF directory with its tokenizer files. Then, each in a fresh process:
  aiayn fp32 / int8   `aiayn import marian` of that directory (aiayn.interop.import_marian), decoded
                      with greedy / beam_search on aiayn.fast.inference.inference_model(model, precision)
  HF generate fp32    MarianMTModel.from_pretrained(directory).generate
  CTranslate2 f32/int8  ct2-transformers-converter's Marian loader (TransformersConverter) on the same
                      directory, translate_batch
Every engine decodes the same weights; outputs are forced to --length tokens (EOS banned before,
the length capped there) as in decode_throughput.py. Pin it to one core with
`taskset -c N env OMP_NUM_THREADS=1 ... --threads 1 --ct2-threads 1x1`; on a machine busy with other
work, `--clock cpu` gives rates per second of the process's own CPU time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from aiayn import bench

ENGINES = ("aiayn-fp32", "aiayn-int8", "hf-fp32", "ct2-float32", "ct2-int8")
NAMES = {"aiayn-fp32": "aiayn fp32", "aiayn-int8": "aiayn int8", "hf-fp32": "HF generate fp32",
         "ct2-float32": "CTranslate2 float32", "ct2-int8": "CTranslate2 int8"}
OPUS = dict(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512)
TINY = dict(vocab_size=301, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


def write_opus_like(directory: Path, shape: dict) -> Path:
    """A random MarianMTModel with OPUS-MT's settings, saved with the tokenizer files that both
    `aiayn import marian` and CTranslate2's converter read."""
    import peers
    from transformers import MarianConfig, MarianMTModel

    V = shape["vocab_size"]
    torch.manual_seed(0)
    cfg = MarianConfig(**shape, activation_function="swish", scale_embedding=True, pad_token_id=V - 1,
                       decoder_start_token_id=V - 1, eos_token_id=0, forced_eos_token_id=None,
                       share_encoder_decoder_embeddings=True, tie_word_embeddings=True, dropout=0.1)
    model = MarianMTModel(cfg).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.1)
    peers.save_with_tokenizer(model, directory)
    return directory


def run_cell(spec: dict) -> dict:
    bench.set_threads(spec.get("threads"))
    directory, L, B, n = Path(spec["dir"]), spec["length"], spec["batch"], spec["sentences"]
    V = json.loads((directory / "config.json").read_text())["vocab_size"]
    src = bench.random_sources(n, L - 1, V, spec["seed"], first_id=2)  # never </s> (0) or <pad> (V - 1)
    src = torch.cat([src, torch.zeros(n, 1, dtype=torch.long)], dim=1)  # a Marian source ends with </s>
    kind, precision = spec["engine"].split("-")
    t_load = time.perf_counter()
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "aiayn":
            from aiayn.decode import beam_search, greedy
            from aiayn.fast.inference import inference_model
            from aiayn.interop import import_marian

            model, tok, _ = import_marian(directory)
            model = inference_model(model, precision)

            def per_batch(s, beam):
                with torch.inference_mode():
                    if beam == 1:
                        out = greedy(model, s, tok.bos_id, tok.eos_id, max_extra=L - s.size(1), min_len=L)
                    else:
                        out = [h[0][0] for h in beam_search(model, s, tok.bos_id, tok.eos_id, beam_size=beam,
                                                            max_extra=L - s.size(1), min_len=L)]
                return [len(o) for o in out]
        elif kind == "hf":
            from transformers import MarianMTModel

            hf = MarianMTModel.from_pretrained(directory).eval()

            def per_batch(s, beam):
                with torch.inference_mode():
                    out = hf.generate(input_ids=s, attention_mask=torch.ones_like(s), num_beams=beam,
                                      do_sample=False, min_new_tokens=L, max_new_tokens=L)
                return [out.size(1) - 1] * out.size(0)
        else:
            import ctranslate2
            from ctranslate2.converters import TransformersConverter

            import peers

            inter, intra = (int(x) for x in spec["ct2_threads"].split("x"))
            TransformersConverter(str(directory)).convert(tmp + "/ct2", quantization=None if precision == "float32"
                                                          else precision, force=True)
            translator = ctranslate2.Translator(tmp + "/ct2", device="cpu", compute_type=precision,
                                                inter_threads=inter, intra_threads=intra)
        load_s = time.perf_counter() - t_load
        result = {"load_s": load_s}
        for beam in spec["beams"]:
            if kind == "ct2":
                tokens = [[peers.token(i) for i in row] for row in src.tolist()]

                def whole(rows, beam=beam):
                    res = translator.translate_batch(rows, max_batch_size=B, beam_size=beam,
                                                     max_decoding_length=L, min_decoding_length=L)
                    return [len(r.hypotheses[0]) for r in res]
                whole(tokens[:B])  # warm-up
                t0 = clock()
                lengths = whole(tokens)
            else:
                per_batch(src[:B], beam)  # warm-up
                t0 = clock()
                lengths = [x for i in range(0, n, B) for x in per_batch(src[i:i + B], beam)]
            seconds = clock() - t0
            result[f"beam{beam}"] = {"tok_s": sum(lengths) / seconds, "sent_s": n / seconds, "seconds": seconds,
                                     "forced": all(x == L for x in lengths)}
    result["rss_gib"] = bench.peak_rss_gib()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help=", ".join(ENGINES))
    p.add_argument("--beams", default="1,4", help="beam sizes; 1 = greedy")
    p.add_argument("--sentences", type=int, default=128)
    p.add_argument("--length", type=int, default=20, help="source and (forced) output length, in tokens")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads for aiayn and HF (default: torch's choice)")
    p.add_argument("--ct2-threads", default="1x1", help="CTranslate2 inter_threads x intra_threads")
    p.add_argument("--rounds", type=int, default=1, help="measure every cell N times, keep the fastest")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: rates per second of the process's CPU time (a busy machine; one thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, few sentences: a check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.sentences, args.length, args.batch = 16, 6, 8
    engines, beams = args.engines.split(","), [int(b) for b in args.beams.split(",")]
    for e in engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}")
    shape = TINY if args.quick else OPUS
    print(bench.header("An imported OPUS-MT-shaped Marian model: aiayn vs HF generate and CTranslate2"))
    print(f"MarianMTModel d_model {shape['d_model']}, {shape['encoder_layers']}+{shape['decoder_layers']} layers, "
          f"{shape['encoder_attention_heads']} heads, d_ff {shape['encoder_ffn_dim']}, vocabulary "
          f"{shape['vocab_size']:,} (random weights); {args.sentences} sentences x {args.length} source tokens, "
          f"outputs forced to {args.length} tokens, batches of {args.batch}; torch threads {args.threads or 'default'}, "
          f"CTranslate2 {args.ct2_threads} (inter x intra); rates per {args.clock} second")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_opus_like(Path(tmp) / "opus", shape)
        script = Path(__file__).resolve()
        for r in range(args.rounds):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                spec = {"engine": e, "dir": str(directory), "beams": beams, "length": args.length,
                        "batch": args.batch, "sentences": args.sentences, "seed": args.seed,
                        "threads": args.threads, "ct2_threads": args.ct2_threads, "clock": args.clock}
                results.setdefault(e, []).append(bench.run_cell(script, spec))
    rows = []
    for beam in beams:
        key = f"beam{beam}"
        per = {e: bench.best_of([x.get(key, x) for x in results[e]], "tok_s") for e in engines}
        ct2 = {e: per[e]["tok_s"] for e in ("ct2-float32", "ct2-int8") if e in per and "error" not in per[e]}
        for e in engines:
            res, search = per[e], "greedy" if beam == 1 else f"beam {beam}"
            if "error" in res:
                rows.append([search, NAMES[e], "failed: " + res["error"], "", "", ""])
                continue
            vs = [f"{res['tok_s'] / ct2[c]:.2f}x" if c in ct2 and not e.startswith("ct2") else ""
                  for c in ("ct2-float32", "ct2-int8")]
            engine = NAMES[e] + ("" if res["forced"] else " (output lengths NOT forced)")
            rows.append([search, engine, bench.fmt(res["sent_s"], 1), bench.fmt(res["tok_s"]), *vs])
    print()
    print(bench.table(["search", "engine", "sentences/s", "target tok/s", "vs CT2 f32", "vs CT2 int8"], rows))
    return 0


if __name__ == "__main__":
    bench.script_main(main, run_cell)
