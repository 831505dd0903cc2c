"""Decoding throughput: aiayn (fp32, bf16, int8) against HF generate and CTranslate2, one run.

    python benchmarks/decode_throughput.py                    # small and base, greedy and beam 4
    python benchmarks/decode_throughput.py --configs small --rounds 3
    python benchmarks/decode_throughput.py --quick            # a tiny model, seconds: checks it works
    python benchmarks/decode_throughput.py --device cuda --engines aiayn-fp32,aiayn-bf16,hf-fp32,hf-bf16
                                                              # on a GPU, against HF there

The task (PEERS.md): 512 random source sentences of 20 tokens, batches of 64, every output forced to
exactly 20 tokens (EOS banned before then, the length capped there), so that random weights decode
as much as trained ones would. Each engine gets a model of the same shape with its own random
weights. Time covers encoding and decoding of all 512 sentences after one warm-up batch; outputs are
checked to be 20 tokens long.

  aiayn plain   greedy / beam_search (aiayn.decode) on the model itself, under torch.inference_mode
  aiayn fp32    the same on aiayn.fast.inference.inference_model(model, "fp32") (what translate() runs):
                linears on oneDNN, not MKL
  aiayn bf16    weights cast to bfloat16, linears on oneDNN
  aiayn int8    every nn.Linear dynamically quantized to int8 (torch.ao quantize_dynamic)
  --workers 2   aiayn's batches split between 2 Python threads of 1 torch thread each (CT2's
                inter_threads=2, intra_threads=1); the default is 1 worker with torch's own threads
  HF fp32/bf16  MarianMTModel.generate(min_new_tokens=20, max_new_tokens=20), bf16 = weights cast
  CT2 f32/int8  the same Marian model converted offline; translate_batch over all 512 sentences with
                max_batch_size=64, inter_threads=2, intra_threads=1 (fastest here, PEERS.md;
                --ct2-threads changes it)

On a busy machine, wall time measures the other load. `--threads 1 --ct2-threads 1x1 --clock cpu`
then gives rates per second of the process's own CPU time, which compare engines fairly (per core).

Counting: target tokens = 20 per sentence (EOS not counted). aiayn's beam search also runs the step
that scores the final EOS (21 decoder steps); HF and CTranslate2 stop at 20 without scoring it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from aiayn import bench
from aiayn.config import ModelConfig, preset
from aiayn.data.tokenizer import BOS, EOS

CONFIGS = {"small": dict(vocab_size=8000), "base": dict(vocab_size=8000), "tiny": dict(vocab_size=64)}
ENGINES = ("aiayn-plain", "aiayn-fp32", "aiayn-bf16", "aiayn-int8", "hf-fp32", "hf-bf16", "ct2-float32",
           "ct2-int8")
NAMES = {"aiayn-plain": "aiayn fp32, plain", "aiayn-fp32": "aiayn fp32", "aiayn-bf16": "aiayn bf16",
         "aiayn-int8": "aiayn int8",
         "hf-fp32": "HF generate fp32", "hf-bf16": "HF generate bf16", "ct2-float32": "CTranslate2 float32",
         "ct2-int8": "CTranslate2 int8"}


def model_config(name: str) -> ModelConfig:
    return preset(name, **CONFIGS[name])


# ------------------------------------------------------------------------------- the engines
def aiayn_engine(cfg: ModelConfig, precision: str, length: int, device: str = "cpu"):
    """-> decode(src (B, S), beam) -> list of output lengths."""
    from aiayn.decode import beam_search, greedy
    from aiayn.fast.inference import inference_model
    from aiayn.memory import keep_freed_memory
    from aiayn.model import build_model

    if device == "cpu":
        keep_freed_memory()  # as the CLI does
    torch.manual_seed(0)
    model = inference_model(build_model(cfg).to(device), precision)

    def decode(src, beam: int) -> list[int]:
        src = src.to(device)
        with torch.inference_mode():
            if beam == 1:
                out = greedy(model, src, BOS, EOS, max_extra=length - src.size(1), min_len=length)
            else:
                hyps = beam_search(model, src, BOS, EOS, beam_size=beam, max_extra=length - src.size(1),
                                   min_len=length)
                out = [h[0][0] for h in hyps]
        return [len(o) for o in out]

    return decode, None


def hf_engine(cfg: ModelConfig, precision: str, length: int, device: str = "cpu"):
    import peers

    model = peers.hf_marian(cfg).eval().to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)

    def decode(src, beam: int) -> list[int]:
        src = src.to(device)
        with torch.inference_mode():
            out = model.generate(input_ids=src, attention_mask=torch.ones_like(src), num_beams=beam,
                                 do_sample=False, min_new_tokens=length, max_new_tokens=length)
        return [out.size(1) - 1] * out.size(0)  # minus the decoder start token

    return decode, None


def ct2_engine(cfg: ModelConfig, compute_type: str, length: int, batch: int, tmp: Path, threads: str):
    import peers

    inter, intra = (int(n) for n in threads.split("x"))
    translator = peers.ct2_translator(peers.hf_marian(cfg).eval(), tmp, compute_type, inter, intra)

    def decode_all(src, beam: int) -> list[int]:
        tokens = [[peers.token(i) for i in row] for row in src.tolist()]
        res = translator.translate_batch(tokens, max_batch_size=batch, beam_size=beam,
                                         max_decoding_length=length, min_decoding_length=length)
        return [len(r.hypotheses[0]) for r in res]

    return None, decode_all


def _in_threads(per_batch, B: int, workers: int):
    """Batches shared out to `workers` threads of one torch thread each (what translate() does)."""
    from aiayn.translate import map_in_workers

    def whole(s, beam):
        parts = map_in_workers(lambda i: per_batch(s[i:i + B], beam), range(0, s.size(0), B), workers)
        return [x for part in parts for x in part]

    return whole


def run_cell(spec: dict) -> dict:
    """One engine, every search: {"greedy": {...}, "beam4": {...}}."""
    bench.set_threads(spec.get("threads"))
    cfg = model_config(spec["config"])
    L, B, n = spec["length"], spec["batch"], spec["sentences"]
    src = bench.random_sources(n, L, cfg.vocab_size, spec["seed"])
    kind, precision = spec["engine"].split("-")[:2]
    device = spec.get("device", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "aiayn":
            per_batch, whole = aiayn_engine(cfg, precision, L, device)
        elif kind == "hf":
            per_batch, whole = hf_engine(cfg, precision, L, device)
        else:
            per_batch, whole = ct2_engine(cfg, precision, L, B, Path(tmp), spec["ct2_threads"])
        if whole is None and spec.get("workers", 1) > 1 and kind == "aiayn":
            whole = _in_threads(per_batch, B, spec["workers"])
        elif whole is None:  # our loop over batches of B
            def whole(s, beam):
                return [x for i in range(0, s.size(0), B) for x in per_batch(s[i:i + B], beam)]
        result = {}
        clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
        for beam in spec["beams"]:
            whole(src[:B], beam)  # warm-up
            bench.synchronize(device)
            t0 = clock()
            lengths = whole(src, beam)
            bench.synchronize(device)
            seconds = clock() - t0
            result[f"beam{beam}"] = {"sent_s": n / seconds, "tok_s": sum(lengths) / seconds,
                                     "seconds": seconds, "forced": all(x == L for x in lengths)}
    result["rss_gib"] = bench.peak_memory_gib(device)
    return result


# ------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="small,base", help="comma-separated: small, base, tiny")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=", ".join(ENGINES) + "; an aiayn engine + '-nokernels' runs it with AIAYN_KERNELS=0")
    p.add_argument("--beams", default="1,4", help="beam sizes; 1 = greedy")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--length", type=int, default=20, help="source and (forced) output length")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, keep the fastest")
    p.add_argument("--threads", type=int, help="torch threads for aiayn and HF (default: torch's choice)")
    p.add_argument("--workers", type=int, default=1, help="aiayn: decode batches in N threads of 1 torch thread")
    p.add_argument("--ct2-threads", default="2x1", help="CTranslate2 inter_threads x intra_threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: per second of process CPU time (all threads), for a busy machine with --threads 1 "
                   "--ct2-threads 1x1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU the peer is HF: CTranslate2 is not run)")
    p.add_argument("--quick", action="store_true", help="tiny model, few sentences: a check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.sentences, args.length, args.batch = "tiny", 16, 6, 8
    gpu = args.device != "cpu"
    if error := bench.device_error(args.device, args.clock):
        p.error(error)
    configs, engines = args.configs.split(","), args.engines.split(",")
    beams = [int(b) for b in args.beams.split(",")]
    for name in configs:
        if name not in CONFIGS:
            p.error(f"unknown config {name!r}")
    for e in engines:
        base = e.removesuffix(bench.NO_KERNELS)
        if base not in ENGINES or (e != base and not base.startswith("aiayn")):
            p.error(f"unknown engine {e!r}")
        NAMES.setdefault(e, NAMES[base] + ", no C kernels")

    bench.set_threads(args.threads)
    print(bench.header("Decoding throughput: aiayn vs HF generate and CTranslate2", args.device))
    print(f"{args.sentences} sentences x {args.length} source tokens, outputs forced to {args.length} "
          f"tokens, batches of {args.batch}; aiayn {args.workers} worker(s), CTranslate2 threads "
          f"{args.ct2_threads} (inter x intra); rates per {args.clock} second")
    def lacks(engine: str) -> str | None:
        if gpu and engine.startswith("ct2"):
            return "not run on a GPU (CTranslate2 is compared on CPUs)"
        return bench.lacks(engine.split("-")[1], args.device)

    cells = [(c, e) for c in configs for e in engines if not lacks(e)]
    results: dict[tuple, list[dict]] = {}
    script = Path(__file__).resolve()
    for r in range(args.rounds):
        for c, e in (cells if r % 2 == 0 else cells[::-1]):
            spec = {"config": c, "engine": e, "beams": beams, "length": args.length, "batch": args.batch,
                    "sentences": args.sentences, "seed": args.seed, "threads": args.threads,
                    "workers": args.workers, "ct2_threads": args.ct2_threads, "clock": args.clock,
                    "device": args.device}
            results.setdefault((c, e), []).append(bench.run_cell(script, spec))

    peers = ("hf-fp32", "hf-bf16") if gpu else ("ct2-float32", "ct2-int8")
    rows = []
    for c in configs:
        cfg = model_config(c)
        for beam in beams:
            key = f"beam{beam}"
            per = {e: bench.best_of([x.get(key, x) for x in results[(c, e)]], "tok_s") if (c, e) in results
                   else {"error": f"not run: {lacks(e)}"} for e in engines}
            peer = {e: per[e]["tok_s"] for e in peers if e in per and "error" not in per[e]}
            for e in engines:
                res = per[e]
                search = "greedy" if beam == 1 else f"beam {beam}"
                name = f"{c} (d{cfg.d_model}, {cfg.n_encoder_layers}+{cfg.n_decoder_layers})"
                if "error" in res:
                    why = res["error"] if res["error"].startswith("not run") else "failed: " + res["error"]
                    rows.append([name, search, NAMES[e], why, "", "", ""])
                    continue
                vs = [f"{res['tok_s'] / peer[p]:.2f}x" if p in peer and not e.startswith(p.split("-")[0]) else ""
                      for p in peers]
                engine = NAMES[e] + ("" if res["forced"] else " (output lengths NOT forced)")
                rows.append([name, search, engine, bench.fmt(res["sent_s"], 1), bench.fmt(res["tok_s"]), *vs])
    print()
    print(bench.table(["config", "search", "engine", "sentences/s", "target tok/s",
                       *(f"vs {NAMES[p]}" for p in peers)], rows))
    return 0


if __name__ == "__main__":
    bench.script_main(main, run_cell)
