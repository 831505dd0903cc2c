"""Score ViT runs of `aiayn train vit` on the shipped mnist10k: the best checkpoint (chosen on the
held-out 1/16 of train, as `aiayn classify --model RUN` does) and the last one, each on the held-out
images and on t10k, with the run's steps and CPU seconds. One JSON line per run, fp32.

    python benchmarks/vit_score.py runs/vit-s1 [runs/vit-s2 ...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from aiayn.checkpoint import TRAINER_JSON, CheckpointError, checkpoints, load_model, load_model_dir
from aiayn.data.images import load_images
from aiayn.tasks.vision import accuracy, split_train_val


def score(run: Path, val, test) -> dict:
    best, _, _, best_dir = load_model(run, "vit")
    last_dir = checkpoints(run)[-1]
    last = load_model_dir(last_dir)[0].eval()
    state = json.loads((last_dir / TRAINER_JSON).read_text())
    return {"run": str(run), "step": state["step"], "cpu_s": round(state.get("cpu_s", 0.0), 1),
            "elapsed_s": round(state["elapsed"], 1), "best": best_dir.name, "last": last_dir.name,
            "best_val": accuracy(best, val), "best_t10k": accuracy(best, test),
            "last_val": accuracy(last, val), "last_t10k": accuracy(last, test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run directory of `aiayn train vit`")
    args = p.parse_args()
    torch.set_num_threads(1)
    _, val = split_train_val(load_images())
    test = load_images(split="t10k")
    for run in args.runs:
        try:
            print(json.dumps(score(run, val, test)), flush=True)
        except CheckpointError as e:
            sys.exit(f"vit_score.py: error: {e}")


if __name__ == "__main__":
    main()
