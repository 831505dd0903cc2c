"""Learning-rate schedules: the cosine over steps, and the cosine over a time budget that ends where
the budget does (the ViT's default: --max-cpu-minutes without --max-steps)."""

import json
import math

import pytest
import torch

from aiayn.config import TrainConfig, ViTConfig
from aiayn.data.images import Labels
from aiayn.errors import InputError
from aiayn.model.vit import VisionTransformer
from aiayn.tasks.vision import ViTTask, vit_train
from aiayn.train.loop import Trainer
from aiayn.train.schedule import budget_fraction, cosine, cosine_by_fraction, learning_rate

from tests.tasks.test_vision import bars

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_by_fraction_warms_up_then_falls_from_peak_to_floor():
    peak, floor = 2e-3, 1e-5
    assert cosine_by_fraction(0, 0.0, peak, warmup=9, floor=floor) == pytest.approx(peak / 10)
    assert cosine_by_fraction(9, 0.0, peak, warmup=9, floor=floor) == pytest.approx(peak)
    assert cosine_by_fraction(500, 0.5, peak, warmup=9, floor=floor) == pytest.approx((peak + floor) / 2)
    assert cosine_by_fraction(900, 1.0, peak, warmup=9, floor=floor) == pytest.approx(floor)
    assert cosine_by_fraction(901, 1.3, peak, warmup=9, floor=floor) == pytest.approx(floor)  # past the budget
    rates = [cosine_by_fraction(100, f / 20, peak, warmup=9, floor=floor) for f in range(21)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # the same curve as the cosine over steps when the steps are spread evenly over the budget
    assert cosine_by_fraction(300, 0.3, peak, 0, floor) == pytest.approx(cosine(300, peak, 0, 1000, floor))


def test_the_budget_fraction_follows_cpu_time_else_wall_time_and_never_overrides_steps():
    state = {"step": 10, "cpu_s": 90.0, "elapsed": 30.0}
    assert budget_fraction(TrainConfig(max_cpu_minutes=15), state) == pytest.approx(0.1)
    assert budget_fraction(TrainConfig(max_minutes=1), state) == pytest.approx(0.5)
    assert budget_fraction(TrainConfig(max_steps=100, max_cpu_minutes=15), state) is None
    assert budget_fraction(TrainConfig(max_epochs=3), state) is None


def test_a_cosine_without_steps_or_a_budget_is_a_clear_error():
    cfg = TrainConfig(schedule="cosine", max_epochs=1)
    with pytest.raises(InputError, match="max_steps"):
        learning_rate(cfg, 5, None, budget_fraction(cfg, {}))


def test_a_cpu_budgeted_run_ends_its_cosine_where_its_budget_ends(tmp_path):
    torch.manual_seed(0)
    data = bars(64)
    cfg = ViTConfig(image_size=8, patch_size=2, n_classes=2, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    task = ViTTask(data, data, cfg, batch_size=16, augmentation=False)
    tcfg = vit_train(max_cpu_minutes=0.01, warmup=2, log_every=1, eval_every=10_000, precision="fp32")
    result = Trainer(task, VisionTransformer(cfg), Labels(data.classes), tcfg, tmp_path / "run").run(progress=False)
    rates = [row["lr"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "lr" in row]
    assert result["step"] >= 20 and len(rates) == result["step"]
    after_warmup = rates[2:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert rates[2] > 0.9 * tcfg.lr and rates[-1] < 0.1 * tcfg.lr and math.isfinite(rates[-1])
