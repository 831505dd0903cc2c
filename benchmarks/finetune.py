"""Fine-tuning, measured: full vs LoRA vs from scratch, at equal CPU time. One run prints the tables
of docs/FINETUNING.md.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/finetune.py            # everything (~55 CPU-min)
    python benchmarks/finetune.py translation --fractions 0.1                  # one part
    python benchmarks/finetune.py --table                                       # the tables of what ran

1. translation: Multi30k EN->FR from the shipped EN->DE model (its tokenizer), on a random 10% of
   the training pairs (2,900; seed 0) and on all 29,000: full fine-tuning, LoRA (targets q,k,v,o,ff;
   rank 8, and rank 32 at 10%), and from scratch (the same `small` shape, its own joint EN+FR BPE
   learned on the same pairs: 4000 pieces on 2,900 pairs, 8000 on 29,000), each for the same CPU
   minutes of its training process (`--max-cpu-minutes`: 4 at 10%, 3 on all pairs); then
   test_2016_flickr FR, beam 4: sacreBLEU and chrF.
2. lm: the shipped Shakespeare character model fine-tuned on the English captions of Multi30k
   (lines with characters outside its vocabulary are left out; the last 10% validate): caption
   validation loss before and after (fp32, the same windows), full vs LoRA rank 8, and samples for
   one prompt before and after.
3. speed: adapter sizes, and greedy decoding speed of the base model, the model with an unmerged
   adapter and the merged model.

Every step runs the `aiayn` commands a user runs (printed as they start); results go to
--out/results/*.json, and a part whose result exists is not run again (delete it to rerun).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiayn.data.corpus import ASSETS  # noqa: E402

EN_DE, SHAKESPEARE = ASSETS / "models" / "en-de", ASSETS / "models" / "shakespeare-char"
M30K = ASSETS / "multi30k"
# name -> extra options of `aiayn train translation`. Learning rates: 1e-3 (the translation recipe's)
# for whole models; 5e-3 for adapters (at 1e-3 LoRA r8 reached 0.23 BLEU at 10%: MORE_ARMS; a 60-step
# pilot at 5e-3 had its loss falling several times faster)
ARMS = {
    "full": ["--init-from", str(EN_DE), "--lr", "1e-3", "--warmup", "50"],
    "lora-r8": ["--init-from", str(EN_DE), "--lora-rank", "8", "--lora-targets", "q,k,v,o,ff", "--lr", "5e-3",
                "--warmup", "50"],
    "lora-r32": ["--init-from", str(EN_DE), "--lora-rank", "32", "--lora-targets", "q,k,v,o,ff", "--lr", "5e-3",
                 "--warmup", "50"],
    "scratch": ["--preset", "small", "--lr", "1e-3", "--warmup", "200"],  # + its own BPE: scratch_vocab()
}
MORE_ARMS = {"full-lr3e-4": ["--init-from", str(EN_DE), "--lr", "3e-4", "--warmup", "50"],  # --arms full-lr3e-4
             "lora-r8-lr1e-3": ["--init-from", str(EN_DE), "--lora-rank", "8", "--lora-targets", "q,k,v,o,ff",
                                "--lr", "1e-3", "--warmup", "50"]}
# fraction of the 29,000 pairs -> (CPU minutes per arm, arms): what the README's tables ran
PLAN = {0.1: (4.0, ["scratch", "full", "lora-r8", "lora-r32"]), 1.0: (3.0, ["full", "scratch", "lora-r8"])}
LM_ARMS = {"full": [], "lora-r8": ["--lora-rank", "8", "--lora-targets", "q,k,v,o,ff"]}
PROMPT = "A man"


def aiayn(*args: str, capture: bool = True) -> str:
    cmd = [sys.executable, "-m", "aiayn.cli", *args]
    print("$ aiayn " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): aiayn {' '.join(args)}")
    return r.stdout or ""


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_facts(run: Path) -> dict:
    """Steps, CPU seconds and trainable parameters of a finished run (its newest checkpoint)."""
    newest = sorted(run.glob("step-*"))[-1]
    state = json.loads((newest / "trainer.json").read_text())
    return {"steps": state["step"], "epochs": state["epoch"], "cpu_s": round(state.get("cpu_s", 0.0), 1),
            "val": state["best"]["value"] if state.get("best") else None}


def save(out: Path, name: str, result: dict) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))


def done(out: Path, name: str) -> bool:
    return (out / "results" / f"{name}.json").is_file()


# ---------------------------------------------------------------------------------- translation
def sample_pairs(out: Path, fraction: float) -> tuple[Path, Path]:
    en = gzip.open(M30K / "train.en.gz", "rt", encoding="utf-8").read().splitlines()
    fr = gzip.open(M30K / "train.fr.gz", "rt", encoding="utf-8").read().splitlines()
    idx = list(range(len(en)))
    if fraction < 1:
        idx = sorted(random.Random(0).sample(idx, round(fraction * len(en))))
    d = out / f"data-{len(idx)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.en").write_text("".join(en[i] + "\n" for i in idx), encoding="utf-8")
    (d / "train.fr").write_text("".join(fr[i] + "\n" for i in idx), encoding="utf-8")
    return d / "train.en", d / "train.fr"


def translation(out: Path, fraction: float, cpu_minutes: float, arms: list[str]) -> None:
    src, tgt = sample_pairs(out, fraction)
    n = sum(1 for _ in open(src, encoding="utf-8"))
    for arm in arms:
        name = f"translation-{n}-{arm}"
        if done(out, name):
            continue
        run = out / "runs" / name
        if run.exists():  # an interrupted run: start it again (its budget is its whole CPU time)
            import shutil

            shutil.rmtree(run)
        t0 = time.perf_counter()
        aiayn("train", "translation", "--src", "en", "--tgt", "fr", "--train-src", str(src), "--train-tgt", str(tgt),
              "--val-src", str(M30K / "val.en.gz"), "--val-tgt", str(M30K / "val.fr.gz"),
              "--max-cpu-minutes", str(cpu_minutes), "--eval-every", "1000000", "--out", str(run), "--quiet",
              *{**ARMS, **MORE_ARMS}[arm], *(["--vocab-size", str(scratch_vocab(n))] if arm == "scratch" else []))
        wall = time.perf_counter() - t0
        model = ["--model", str(run)] if not arm.startswith("lora") else \
            ["--model", str(EN_DE), "--adapter", str(run / "adapter.safetensors")]
        score = last_json(aiayn("evaluate", *model, "--split", "test_2016_flickr", "--beam", "4", "--workers", "1"))
        facts = run_facts(run)
        run_json = json.loads((run / "run.json").read_text())
        result = {"pairs": n, "arm": arm, **facts, "train_wall_s": round(wall, 1),
                  "trainable": trainable(run_json, arm), "bleu": score["sacrebleu"], "chrf": score["chrf"],
                  "signature": score["signature"], "precision": run_json["train"]["precision"],
                  "options": {**ARMS, **MORE_ARMS}[arm], "cpu_minutes": cpu_minutes}
        save(out, name, result)
        print(json.dumps(result), file=sys.stderr)


def scratch_vocab(pairs: int) -> int:
    """The scratch model's joint BPE size: the shipped model's 8000 on all of Multi30k, 4000 on a
    tenth of it (fewer, better-trained pieces for little data: in scratch's favour)."""
    return 8000 if pairs > 10_000 else 4000


def trainable(run_json: dict, arm: str) -> int:
    from aiayn.config import ModelConfig
    from aiayn.lora import LoRAConfig, add_lora
    from aiayn.model import build_model

    model = build_model(ModelConfig.from_dict(run_json["model"]))
    if "lora" in run_json:
        add_lora(model, LoRAConfig.from_dict(run_json["lora"]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- lm
def caption_loss(model_dir: Path, adapter: Path | None = None) -> float:
    """Validation loss (nats/char, fp32) on the last 10% of the captions the model's characters can write."""
    import torch

    from aiayn.checkpoint import load_model_dir
    from aiayn.data.corpus import read_text
    from aiayn.finetune import apply_adapter, fit_text
    from aiayn.tasks.lm import LMTask

    model, tok, _, extra = load_model_dir(model_dir)
    if adapter is not None:
        apply_adapter(model, extra, adapter, "lm")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = fit_text(read_text(M30K / "train.en.gz"), tok)
    task = LMTask.from_text(text, tok, 12, model.cfg.max_len)
    with torch.no_grad():
        return task.validate(model.eval(), None)["val_loss"]


def sample(model_dir: Path, adapter: Path | None = None) -> str:
    extra = ["--adapter", str(adapter)] if adapter else []
    return aiayn("generate", "--model", str(model_dir), *extra, "--prompt", PROMPT, "-n", "160", "--seed", "1",
                 "--temperature", "0.8", "--precision", "fp32").strip()


def lm(out: Path, cpu_minutes: float) -> None:
    if not done(out, "lm-base"):
        save(out, "lm-base", {"arm": "base", "val_loss": caption_loss(SHAKESPEARE), "sample": sample(SHAKESPEARE)})
    for arm, options in LM_ARMS.items():
        name = f"lm-{arm}"
        if done(out, name):
            continue
        run = out / "runs" / name
        if run.exists():
            import shutil

            shutil.rmtree(run)
        aiayn("train", "lm", "--init-from", str(SHAKESPEARE), "--data", str(M30K / "train.en.gz"),
              "--max-cpu-minutes", str(cpu_minutes), "--max-steps", "100000", "--eval-every", "1000000",
              "--out", str(run), "--quiet", *options)
        adapter = run / "adapter.safetensors" if arm.startswith("lora") else None
        model = SHAKESPEARE if adapter else run
        facts = run_facts(run)
        run_json = json.loads((run / "run.json").read_text())
        save(out, name, {"arm": arm, **facts, "trainable": trainable(run_json, arm),
                         "val_loss": caption_loss(model if adapter else _best(run), adapter),
                         "sample": sample(model, adapter), "options": options, "cpu_minutes": cpu_minutes,
                         "precision": run_json["train"]["precision"]})


def _best(run: Path) -> Path:
    from aiayn.checkpoint import best_checkpoint

    return best_checkpoint(run)


# ---------------------------------------------------------------------------------------- speed
def speed(out: Path, n_sentences: int = 300, batch: int = 50, rounds: int = 5) -> None:
    """Incremental decoding (encode, then one decode_step per target token, as greedy and beam search
    run) of the first n test sentences, one thread, CPU time: the base model, the model with an
    unmerged adapter and the merged model all decode the same tokens (the base model's greedy
    translations), so that each does the same work."""
    import torch

    from aiayn.checkpoint import load_model_dir
    from aiayn.data.corpus import multi30k
    from aiayn.finetune import apply_adapter
    from aiayn.translate import inference_model, translate  # (inference_model: where decoding takes it from)

    if done(out, "speed"):
        return
    found = sorted((out / "runs").glob("translation-*-lora-r8*/adapter.safetensors"))  # any rank-8 adapter
    if not found:
        raise SystemExit("speed: run `translation --fractions 0.1` first (it trains the adapters)")
    adapter = found[0]
    sources = [s for s, _ in multi30k("test_2016_flickr", "en", "fr")][:n_sentences]
    base, tok, _, _ = load_model_dir(EN_DE)
    targets = [[tok.bos_id] + tok.encode(h) for h in translate(base, tok, sources, beam=1, precision="fp32")]
    pad = tok.pad_id

    def padded(rows):
        t = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            t[i, :len(r)] = torch.tensor(r)
        return t

    work = [(padded([tok.encode(s) for s in sources[i:i + batch]]), padded(targets[i:i + batch]))
            for i in range(0, len(sources), batch)]
    n_tokens = sum(len(t) for t in targets)

    def decode_all(model):
        with torch.inference_mode():
            for src, tgt in work:
                memory, mask = model.encode(src)
                cache = model.init_cache(memory, mask, tgt.size(1))
                for t in range(tgt.size(1)):
                    model.decode_step(tgt[:, t:t + 1], cache)

    forms = {}
    for form, precision in (("base", "plain"), ("unmerged adapter", "plain"), ("merged adapter", "plain"),
                            ("base", "fp32"), ("merged adapter", "fp32")):
        model, tok, _, extra = load_model_dir(EN_DE)
        if form != "base":
            apply_adapter(model, extra, adapter, "translation", merged=form.startswith("merged"))
        forms[form, precision] = inference_model(model, precision)
        decode_all(forms[form, precision])  # warm up (kernels, allocator)
    best = dict.fromkeys(forms, math.inf)
    for _ in range(rounds):  # round-robin, the fastest of each: a shared CPU slows some rounds
        for key, model in forms.items():
            t0 = time.process_time()
            decode_all(model)
            best[key] = min(best[key], time.process_time() - t0)
    rows = [{"form": f, "precision": p, "tok_s": round(n_tokens / t), "cpu_s": round(t, 2)} for (f, p), t in best.items()]
    print(json.dumps(rows), file=sys.stderr)
    save(out, "speed", {"rows": rows, "base_bytes": (EN_DE / "model.safetensors").stat().st_size,
                        "sentences": len(sources), "tokens": n_tokens, "batch": batch, "threads": 1,
                        "rounds": rounds})


# ---------------------------------------------------------------------------------------- tables
def tables(out: Path) -> str:
    res = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    cpu = _cpu()
    lines = [f"CPU: {cpu}, one thread pinned to one core (OMP_NUM_THREADS=1, taskset), shared with other work", ""]
    for n in sorted({r["pairs"] for r in res.values() if "pairs" in r}):
        rows = [r for r in res.values() if r.get("pairs") == n]
        lines += [f"EN->FR, {n:,} training pairs, {rows[0]['cpu_minutes']} CPU-minutes each, test_2016_flickr "
                  "(beam 4):", "",
                  "| arm | trainable params | peak lr | steps | CPU s | sacreBLEU | chrF |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for arm in {**ARMS, **MORE_ARMS}:
            r = next((r for r in rows if r["arm"] == arm), None)
            if r:
                lr = r["options"][r["options"].index("--lr") + 1]
                lines.append(f"| {arm} | {r['trainable']:,} | {lr} | {r['steps']} | {r['cpu_s']:.0f} | {r['bleu']:.2f} | "
                             f"{r['chrf']:.2f} |")
        lines.append("")
    if "lm-base" in res:
        lines += ["Shakespeare LM on Multi30k captions (validation loss, nats/char, fp32):", "",
                  "| model | trainable params | steps | CPU s | caption val loss |", "|---|---:|---:|---:|---:|",
                  f"| shipped (before) | - | - | - | {res['lm-base']['val_loss']:.3f} |"]
        for arm in LM_ARMS:
            r = res.get(f"lm-{arm}")
            if r:
                lines.append(f"| {arm} | {r['trainable']:,} | {r['steps']} | {r['cpu_s']:.0f} | {r['val_loss']:.3f} |")
        lines += ["", f"Samples for the prompt {PROMPT!r} (seed 1, temperature 0.8):", ""]
        for key in ("lm-base", *(f"lm-{a}" for a in LM_ARMS)):
            if key in res:
                lines += [f"{key}:", "```", res[key]["sample"], "```"]
        lines.append("")
    if "speed" in res:
        s = res["speed"]
        sizes = {p.parent.name.split("-", 2)[2]: p.stat().st_size
                 for p in sorted((out / "runs").glob("translation-2900-lora-r*/adapter.safetensors"))}
        lines += [f"Adapter files (targets q,k,v,o,ff; base model {s['base_bytes'] / 1e6:.1f} MB): "
                  + ", ".join(f"{a} {b / 1024:.0f} KB" for a, b in sizes.items()), "",
                  f"Decoding speed: the first {s['sentences']} test sentences in batches of {s['batch']}, "
                  f"{s['tokens']:,} target tokens fed one decode_step at a time (the same tokens for every form), "
                  f"1 thread, CPU time, the fastest of {s.get('rounds', 3)} rounds taken in turn (plain: the model itself; fp32: aiayn's inference copy, oneDNN "
                  "linears):", "",
                  "| model | precision | target tokens/s |", "|---|---|---:|"]
        for r in s["rows"]:
            lines.append(f"| {r['form']} | {r['precision']} | {r['tok_s']:,} |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", nargs="?", default="all", choices=["all", "translation", "lm", "speed"])
    p.add_argument("--fractions", default="0.1,1", help="translation: fractions of the 29,000 pairs (default 0.1,1)")
    p.add_argument("--arms", help=f"translation arms, of {','.join({**ARMS, **MORE_ARMS})} (default: 0.1: all "
                   "four of the first, 1: full, scratch, lora-r8)")
    p.add_argument("--cpu-minutes", type=float, help="translation: CPU minutes per arm (default: 4 at 0.1, 3 at 1)")
    p.add_argument("--lm-cpu-minutes", type=float, default=2.0, help="lm: CPU minutes per arm (default 2)")
    p.add_argument("--out", default="runs/finetune", help="working directory (default runs/finetune)")
    p.add_argument("--table", action="store_true", help="only print the tables of what has run")
    args = p.parse_args()
    out = Path(args.out)
    if not args.table:
        if args.part in ("all", "translation"):
            for f in map(float, args.fractions.split(",")):
                minutes, arms = PLAN.get(f, (4.0, list(ARMS)))
                translation(out, f, args.cpu_minutes or minutes, args.arms.split(",") if args.arms else arms)
        if args.part in ("all", "lm"):
            lm(out, args.lm_cpu_minutes)
        if args.part in ("all", "speed"):
            speed(out)
    print(tables(out))


if __name__ == "__main__":
    main()
