"""`aiayn train vit`, `classify`, `explain IMAGE`, `train image-gpt` and `generate-image` end to end
on tiny generated data: runs resume, bad files get one-line errors while others are classified."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from aiayn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
VIT = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-layers", "1", "--patch-size", "4",
       "--batch-size", "8", "--quiet"]
PIX = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-layers", "1", "--levels", "4",
       "--batch-size", "4", "--quiet"]


def _idx(array):
    return gzip.compress(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
                         + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 images of 8x8: class 0 a vertical bar, class 1 a horizontal one; IDX and PNG copies."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = np.zeros((32, 8, 8), dtype=np.uint8)
    labels = np.arange(32) % 2
    for i in range(32):
        j = rng.integers(1, 7)
        if labels[i]:
            images[i, j, 1:7] = 255
        else:
            images[i, 1:7, j] = 255
    (root / "train-images-idx3-ubyte.gz").write_bytes(_idx(images))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(_idx(labels))
    for i in range(2):
        Image.fromarray(images[i], mode="L").save(root / f"img{i}.png")
    Image.new("L", (9, 8)).save(root / "wide.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vit_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "run"
    assert main(["train", "vit", "--data", str(data), "--out", str(out), "--max-steps", "6", "--eval-every", "3",
                 *VIT]) == 0
    return out


def test_train_vit_and_resume(vit_run, data, capsys):
    assert (vit_run / "step-00000006" / "labels.json").is_file() and (vit_run / "curves.png").is_file()
    capsys.readouterr()
    assert main(["train", "vit", "--out", str(vit_run), "--resume", "--max-steps", "8", "--quiet"]) == 0
    assert '"step": 8' in capsys.readouterr().out
    assert main(["train", "image-gpt", "--out", str(vit_run), "--resume", "--quiet"]) == 2
    assert "holds a vit run" in capsys.readouterr().err


def test_a_time_budget_without_max_steps_sizes_the_cosine_to_the_budget(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vit", "--data", str(data), "--out", str(out), "--max-cpu-minutes", "0.005",
                 "--warmup", "1", "--precision", "fp32", *VIT]) == 0
    settings = json.loads((out / "run.json").read_text())["train"]
    assert settings["max_steps"] is None and settings["max_cpu_minutes"] == 0.005
    rates = [row["lr"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in row]
    assert rates and rates[-1] < settings["lr"] / 10  # the budget is spent: the cosine is at its floor
    capsys.readouterr()
    assert main(["train", "vit", "--data", str(data), "--out", str(tmp_path / "steps"), "--max-steps", "2",
                 "--max-cpu-minutes", "5", *VIT]) == 0
    assert json.loads((tmp_path / "steps" / "run.json").read_text())["train"]["max_steps"] == 2


def test_image_gpt_stops_given_replace_both_defaults(data, tmp_path):
    assert main(["train", "image-gpt", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-cpu-minutes", "0.003", "--warmup", "1", *PIX]) == 0
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["train"]
    assert (settings["max_steps"], settings["max_minutes"], settings["max_cpu_minutes"]) == (None, None, 0.003)
    assert (settings["lr"], settings["min_lr"]) == (2e-3, 2e-4)


def test_image_gpt_cosine_ends_at_a_tenth_of_the_peak_given(data, tmp_path):
    """--lr 1e-4 (fine-tuning, say): the floor follows it down, never above the peak."""
    assert main(["train", "image-gpt", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--warmup", "1", "--lr", "1e-4", *PIX]) == 0
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["train"]
    assert settings["lr"] == 1e-4 and settings["min_lr"] == pytest.approx(1e-5)


def test_classify_prints_one_line_per_file_and_errors_for_bad_ones(vit_run, data, capsys):
    capsys.readouterr()
    files = [data / "img0.png", data / "empty.png", data / "img1.png", data / "wide.png", data / "notes.png",
             data / "missing.png"]
    assert main(["classify", "--model", str(vit_run), "--top-k", "2", *map(str, files)]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(data / "img0.png"), str(data / "img1.png")]
    for line in lines:
        _, l1, p1, l2, p2 = line.split("\t")
        # IDX labels are digits: the model has 10 classes, of which the data uses 2
        assert l1 != l2 and {l1, l2} <= set("0123456789") and 1 >= float(p1) >= float(p2) > 0
    errors = err.strip().split("\n")
    assert len(errors) == 4 and all(e.startswith("aiayn: error: ") for e in errors)
    assert "empty file" in err and "9x8 pixels, the model takes 8x8" in err and "not an image" in err
    assert main(["classify", "--model", str(vit_run), str(data / "img0.png")]) == 0
    assert len(capsys.readouterr().out.strip().split("\t")) == 3


def test_explain_image(vit_run, data, tmp_path, capsys):
    capsys.readouterr()
    assert main(["explain", "--model", str(vit_run), str(data / "img0.png"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer 0: class token attends most to patch row" in out and "rollout" in out
    assert (tmp_path / "attention_layer0.png").is_file() and (tmp_path / "rollout.png").is_file()
    assert main(["explain", "--model", str(vit_run), str(data / "empty.png"), "--out", str(tmp_path)]) == 1
    assert "empty file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pix_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pix") / "run"
    assert main(["train", "image-gpt", "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--eval-every", "4", *PIX]) == 0
    return out


def test_pixels_train_generate_and_complete(pix_run, data, tmp_path, capsys):
    out = pix_run
    assert "val_bpp" in (out / "metrics.jsonl").read_text()
    grid = tmp_path / "grid.png"
    args = ["generate-image", "--model", str(out), "--label", "1", "--n", "4", "--seed", "1", "--scale", "1"]
    assert main([*args, "--out", str(grid)]) == 0
    first = np.asarray(Image.open(grid))
    assert first.shape == (2 * 10 + 2, 2 * 10 + 2) and set(np.unique(first)) <= {0, 85, 128, 170, 255}
    assert main([*args, "--out", str(grid)]) == 0
    assert np.array_equal(np.asarray(Image.open(grid)), first)  # the same seed, the same images
    assert main([*args, "--guidance", "2", "--out", str(grid)]) == 0
    assert np.asarray(Image.open(grid)).shape == first.shape
    assert main(["generate-image", "--model", str(out), "--prompt-image", str(data / "img1.png"), "--keep-rows", "4",
                 "--n", "2", "--scale", "1", "--seed", "2", "--out", str(grid)]) == 0
    done = np.asarray(Image.open(grid))
    prompt = np.asarray(Image.open(data / "img1.png"))
    assert np.array_equal(done[2:6, 2:10], prompt[:4]) and np.array_equal(done[2:6, 12:20], prompt[:4])
    capsys.readouterr()
    for bad, message in ((["--label", "12"], "unknown label '12'"), (["--n", "0"], "--n must be >= 1"),
                         (["--temperature", "0"], "--temperature must be > 0"),
                         (["--guidance", "-1"], "--guidance must be >= 0"),
                         (["--guidance", "nan"], "--guidance must be >= 0"),
                         (["--keep-rows", "3"], "--keep-rows needs --prompt-image"),
                         (["--prompt-image", str(data / "wide.png")], "9x8 pixels"),
                         (["--out", str(tmp_path / "x.jpg")], "ending in .png")):
        assert main(["generate-image", "--model", str(out), *bad]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_wrong_model_kind(vit_run, data, capsys):
    capsys.readouterr()
    assert main(["generate-image", "--model", str(vit_run), "--out", "x.png"]) == 1
    assert "holds a vit model, not a image-gpt model" in capsys.readouterr().err


def _class_folders(root, data):
    """The bars of `data` as a class-folder tree with other class names ("h", "v")."""
    from aiayn.data.images import load_images

    images = load_images(data, split="train")
    for name, label in (("v", 0), ("h", 1)):
        (root / name).mkdir(parents=True)
        for i in (images.labels == label).nonzero().flatten().tolist()[:8]:
            Image.fromarray(images.images[i].numpy(), mode="L").save(root / name / f"{i}.png")
    return root


def test_vit_fine_tuning_a_linear_probe_on_new_classes(vit_run, data, tmp_path, capsys):
    """--init-from a ViT with other classes: a new head, and with embeddings and encoder frozen only
    the head trains (the trained layers are left exactly as they were); the run resumes frozen."""
    from aiayn.checkpoint import load_model_dir, model_dir

    base, _, _, _ = load_model_dir(model_dir(vit_run))  # what --init-from RUN takes: its best checkpoint
    folders = _class_folders(tmp_path / "folders", data)
    out = tmp_path / "probe"
    assert main(["train", "vit", "--data", str(folders), "--init-from", str(vit_run), "--freeze",
                 "embeddings,encoder", "--out", str(out), "--max-steps", "3", "--eval-every", "3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "a new head for the data classes" in err and "parameters trainable" in err
    tuned, labels, _, extra = load_model_dir(out / "step-00000003")
    assert labels.classes == ["h", "v"] and extra["freeze"] == ["embeddings", "encoder"]
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in tuned_state.items() if not k.startswith("head."))
    assert not torch.equal(tuned.head.weight, torch.zeros_like(tuned.head.weight))  # the head learned
    assert main(["train", "vit", "--out", str(out), "--resume", "--max-steps", "5", "--quiet"]) == 0
    resumed, _, _, _ = load_model_dir(out / "step-00000005")
    assert torch.equal(resumed.encoder.layers[0].ff.w1.weight, base.encoder.layers[0].ff.w1.weight)


def test_image_gpt_fine_tuning_keeps_the_palette(pix_run, data, tmp_path, capsys):
    from aiayn.checkpoint import load_model_dir

    out = tmp_path / "tuned"
    assert main(["train", "image-gpt", "--data", str(data), "--init-from", str(pix_run), "--freeze", "embeddings",
                 "--out", str(out), "--max-steps", "2", "--eval-every", "2", "--quiet"]) == 0
    tuned, tok, _, extra = load_model_dir(out / "step-00000002")
    assert tok.levels == 4 and extra["init_from"] == str(pix_run.resolve())
    capsys.readouterr()
    assert main(["train", "image-gpt", "--data", str(data), "--init-from", str(pix_run), "--d-model", "32",
                 "--out", str(tmp_path / "x"), "--max-steps", "1"]) == 2
    assert "--init-from keeps the model's shape: drop --d-model" in capsys.readouterr().err
    assert main(["train", "vit", "--data", str(data), "--init-from", str(pix_run), "--out", str(tmp_path / "y"),
                 "--max-steps", "1"]) == 1
    assert "not a vit model" in capsys.readouterr().err


@pytest.mark.bf16
@pytest.mark.parametrize("shape", [["--positional", "sincos2d", "--pool", "mean"], ["--positional", "learned", "--pool", "cls"]])
def test_vit_trains_as_a_bf16_model(data, tmp_path, shape):
    """bf16-model: fp32 images and the fp32 sinusoidal positions meet the bf16 copy's layers."""
    assert main(["train", "vit", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--eval-every", "2", "--precision", "bf16-model", *VIT, *shape]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["precision"] == "bf16-model"
