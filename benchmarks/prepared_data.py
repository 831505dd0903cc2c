"""Corpora larger than memory (docs/DISTRIBUTED.md, "Measured"): a generated corpus, the memory of
training on it, and the cost of the memory-mapped data path against the in-memory one.

    python benchmarks/prepared_data.py generate OUT_PREFIX 5000000     # OUT_PREFIX.en / .de
    python benchmarks/prepared_data.py rss RUN_DIR -- aiayn train translation ... --out RUN_DIR
    python benchmarks/prepared_data.py datapath MULTI30K_PREPARED BIG_PREPARED

generate: Multi30k training pairs drawn with replacement (seed 0), written 10,000 at a time.
rss:      runs the command, samples its RSS every second, prints the peak (VmHWM), nine samples
          across the run and the tokens/s of every window of metrics.jsonl.
datapath: per batch, the time to fetch a batch's pairs and pad them (150 batches of epoch 0, the
          small preset's max_len 256 and --max-tokens 4096), and the time to compute an epoch's
          batches, for Multi30k in memory, Multi30k prepared and a large prepared corpus.
Run each pinned to a core (taskset -c 1 env OMP_NUM_THREADS=1 ...).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path


def generate(prefix: str, n: int) -> None:
    from aiayn.data.corpus import multi30k

    pairs, rng = multi30k("train"), random.Random(0)
    with open(prefix + ".en", "w", encoding="utf-8") as fs, open(prefix + ".de", "w", encoding="utf-8") as ft:
        for start in range(0, n, 10_000):
            block = [pairs[rng.randrange(len(pairs))] for _ in range(min(10_000, n - start))]
            fs.writelines(s + "\n" for s, _ in block)
            ft.writelines(t + "\n" for _, t in block)


def rss(run_dir: str, cmd: list[str]) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples, peak, t0 = [], 0, time.time()
    while p.poll() is None:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            samples.append((round(time.time() - t0), int(status.split("VmRSS:")[1].split()[0]) // 1024))
            peak = int(status.split("VmHWM:")[1].split()[0]) // 1024
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(1)
    err = p.stderr.read().decode()
    metrics = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    n = len(samples)
    print(json.dumps({"rc": p.returncode, "peak_rss_mb": peak, "wall_s": round(time.time() - t0),
                      "rss_mb_over_time": [samples[i * (n - 1) // 8] for i in range(9)] if n else [],
                      "tok_s_windows": [round(r["tok_s"]) for r in rows if "tok_s" in r]}))
    if p.returncode:
        print(err[-2000:], file=sys.stderr)


def datapath(small: str, big: str) -> None:
    from aiayn.data.corpus import multi30k
    from aiayn.data.prepared import Prepared
    from aiayn.tasks.translation import PreparedTranslationTask, TranslationTask

    prepared = Prepared(small, "translation")
    tok = prepared.tokenizer()
    result = {}
    t = time.perf_counter()
    in_memory = TranslationTask(tok, multi30k("train"), multi30k("val"), 4096, 256, eval_bleu=False)
    result["in_memory_encode_s"] = round(time.perf_counter() - t, 2)
    tasks = {"in_memory": in_memory,
             "prepared": PreparedTranslationTask(prepared, tok, 4096, 256, eval_bleu=False),
             "big": PreparedTranslationTask(Prepared(big, "translation"), tok, 4096, 256, eval_bleu=False)}
    for name, task in tasks.items():
        t = time.perf_counter()
        epoch = task.epoch_batches(0, 1)
        result[f"{name}_epoch_batches_s"] = round(time.perf_counter() - t, 2)
        n = min(150, len(epoch))
        t = time.perf_counter()
        for b in range(n):
            task._collate([task.train[i] for i in epoch[b]])
        result[f"{name}_fetch_pad_ms_per_batch"] = round(1000 * (time.perf_counter() - t) / n, 3)
        result[f"{name}_batches"] = len(epoch)
    print(json.dumps(result))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "generate":
        generate(sys.argv[2], int(sys.argv[3]))
    elif what == "rss" and "--" in sys.argv:
        rss(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
    elif what == "datapath":
        datapath(sys.argv[2], sys.argv[3])
    elif what in ("-h", "--help"):
        print(__doc__)
    else:
        sys.exit(__doc__)
