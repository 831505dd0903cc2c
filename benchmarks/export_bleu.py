"""The shipped EN->DE model exported to the HF format and decoded by transformers' generate: the same
BLEU as aiayn on test_2016_flickr, where both run the same search.

    python benchmarks/export_bleu.py            # 1000 sentences: greedy and beam 4
    python benchmarks/export_bleu.py --quick    # the first 100

`aiayn export hf` writes the model as a MarianMTModel. aiayn's models read sources without a final
</s>; transformers' MarianTokenizer appends one, so HF is run twice: on aiayn's own source ids (the
model's inputs as trained) and on MarianTokenizer's. Length penalties differ: aiayn's alpha is GNMT's
((5 + |Y|) / 6) ** alpha, HF's length_penalty divides by |Y| ** length_penalty (|Y| counting </s> in
both); at 0 both rank by log-probability, so the beam rows use alpha = length_penalty = 0 and HF's
early_stopping=True (aiayn's rule: a sentence ends with beam-size finished hypotheses). The last rows
give each the model's own penalty (its recorded alpha, which `aiayn evaluate` uses), a different
search in each.
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
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    n = 100 if args.quick else args.sentences
    torch.set_num_threads(args.threads)

    from transformers import MarianMTModel, MarianTokenizer

    from aiayn.checkpoint import load_model_dir
    from aiayn.data.batching import pad
    from aiayn.data.corpus import ASSETS, multi30k
    from aiayn.evaluate import bleu
    from aiayn.interop import export_hf
    from aiayn.translate import translate

    pairs = multi30k("test_2016_flickr", "en", "de")[:n]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    model, tok, task, extra = load_model_dir(ASSETS / "models" / "en-de")
    print(bench.header("The shipped EN->DE model: aiayn vs its HF export decoded by transformers' generate"))
    print(f"test_2016_flickr, {n} sentences, batches of {args.batch}, {args.threads} thread(s); sacreBLEU")
    rows = []
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
