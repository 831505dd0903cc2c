"""Fine-tuning end to end (aiayn.finetune through `aiayn`): full with --freeze, LoRA for translation and
language models, the adapter on every decoding command and in `aiayn merge`, exact resume of a
LoRA run, and one-line errors for every bad request."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aiayn.cli import main
from aiayn.lora import ADAPTER_FILE
from train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained translation model (the base to fine-tune) and its corpus directory."""
    d = tmp_path_factory.mktemp("base")
    assert main(tiny.cli_train_args(d, d / "run", "--max-steps", "6", "--lr", "1e-2", "--eval-every", "6")) == 0
    return d, sorted((d / "run").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def lora_run(base):
    d, checkpoint = base
    out = d / "lora"
    assert main(tiny.cli_train_args(d, out, "--init-from", str(checkpoint), "--lora-rank", "2", "--lora-alpha", "4",
                                    "--lora-targets", "q,v,ff", "--max-steps", "4", "--eval-every", "2",
                                    "--lr", "1e-2")) == 0
    return out


def _out(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def _error(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(args)) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("aiayn: error: ") and "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_lora_run_trains_the_adapter_only_and_writes_it(base, lora_run):
    _, checkpoint = base
    run = json.loads((lora_run / "run.json").read_text())
    assert run["lora"]["rank"] == 2 and run["lora"]["targets"] == ["q", "v", "ff"] and run["lora"]["task"] == "translation"
    start, end = tiny.weights(checkpoint), tiny.weights(sorted(lora_run.glob("step-*"))[-1])
    adapted = {k for k in end if k.endswith((".lora_A", ".lora_B"))}
    assert adapted and set(end) - adapted == set(start)
    tiny.assert_same_weights(start, {k: v for k, v in end.items() if k not in adapted})  # the base did not move
    assert any(end[k].abs().sum() > 0 for k in adapted if k.endswith("lora_B"))  # the adapter did
    adapter = load_file(str(lora_run / ADAPTER_FILE))
    assert set(adapter) == adapted


def test_the_adapter_decodes_the_same_merged_unmerged_or_as_a_run(base, lora_run, tmp_path, capsys):
    d, checkpoint = base
    src, _ = tiny.write_corpus(d, tiny.VAL, "val")
    args = ["--input", str(src), "--beam", "2", "--precision", "fp32"]
    with_adapter = _out(capsys, "translate", "--model", str(checkpoint), "--adapter", str(lora_run), *args)
    assert with_adapter == _out(capsys, "translate", "--model", str(lora_run), *args)  # its best checkpoint, merged
    merged = tmp_path / "merged"
    _out(capsys, "merge", str(checkpoint), "--adapter", str(lora_run / ADAPTER_FILE), "--out", str(merged))
    assert with_adapter == _out(capsys, "translate", "--model", str(merged), *args)
    assert with_adapter != _out(capsys, "translate", "--model", str(checkpoint), *args)  # the adapter matters
    score = json.loads(_out(capsys, "evaluate", "--model", str(checkpoint), "--adapter", str(lora_run),
                            "--src-file", str(src), "--ref-file", str(d / "val.xx"), "--beam", "1"))
    assert 0 <= score["sacrebleu"] <= 100


def test_a_lora_run_averages_into_a_plain_model(base, lora_run, tmp_path, capsys):
    from aiayn.checkpoint import load_model_dir

    _out(capsys, "average", str(lora_run), "--last", "2", "--out", str(tmp_path / "avg"))
    model, _, _, extra = load_model_dir(tmp_path / "avg")
    assert "lora" not in extra
    a, b = (load_model_dir(lora_run / f"step-0000000{i}")[0].state_dict() for i in (2, 4))
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, rtol=0, atol=1e-6, msg=name)


def test_resuming_a_lora_run_is_exact(base, tmp_path):
    d, checkpoint = base
    options = ["--init-from", str(checkpoint), "--lora-rank", "2", "--eval-every", "2", "--lr", "1e-2"]
    straight, legs = tmp_path / "straight", tmp_path / "legs"
    assert main(tiny.cli_train_args(d, straight, *options, "--max-steps", "4")) == 0
    assert main(tiny.cli_train_args(d, legs, *options, "--max-steps", "2")) == 0
    assert main(["train", "translation", "--out", str(legs), "--resume", "--max-steps", "4", "--quiet"]) == 0
    tiny.assert_same_weights(tiny.weights(straight / "step-00000004"), tiny.weights(legs / "step-00000004"))
    assert load_file(str(legs / ADAPTER_FILE)).keys() == load_file(str(straight / ADAPTER_FILE)).keys()


def test_serve_and_explain_take_the_adapter(base, lora_run, tmp_path, capsys):
    from aiayn.checkpoint import load_model_dir
    from aiayn.serve.models import load_models

    _, checkpoint = base
    models = load_models(checkpoint, None, adapters=[lora_run / ADAPTER_FILE])
    expected, *_ = load_model_dir(lora_run / "step-00000004")  # a LoRA checkpoint loads merged
    for (name, a), b in zip(models.translation.model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="no translation model is served"):
        load_models(None, None, adapters=[lora_run / ADAPTER_FILE])
    out = _out(capsys, "explain", "--model", str(checkpoint), "--adapter", str(lora_run), "the red dog",
               "--out", str(tmp_path / "x"), "--precision", "fp32")
    assert "wrote" in out


def test_a_run_killed_before_writing_its_adapter_still_gives_it(base, lora_run, tmp_path, capsys):
    _, checkpoint = base
    args = ["translate", "--model", str(checkpoint), "--precision", "fp32", "the red dog sees the ball"]
    expected = _out(capsys, *args, "--adapter", str(lora_run))
    (lora_run / ADAPTER_FILE).rename(tmp_path / ADAPTER_FILE)
    try:
        assert _out(capsys, *args, "--adapter", str(lora_run)) == expected  # from its best checkpoint
    finally:
        (tmp_path / ADAPTER_FILE).rename(lora_run / ADAPTER_FILE)
    assert "not a checkpoint of a LoRA run" in _error(capsys, *args, "--adapter", str(checkpoint.parent))


@pytest.mark.bf16
def test_lora_trains_with_a_bf16_model_copy(base, tmp_path):
    d, checkpoint = base
    out = tmp_path / "bf16"
    assert main(tiny.cli_train_args(d, out, "--init-from", str(checkpoint), "--lora-rank", "2", "--max-steps", "2",
                                    "--lr", "1e-2", "--precision", "bf16-model")) == 0
    end = tiny.weights(out / "step-00000002")
    tiny.assert_same_weights(tiny.weights(checkpoint), {k: v for k, v in end.items() if "lora_" not in k})
    assert any(v.abs().sum() > 0 for k, v in end.items() if k.endswith("lora_B"))


def test_freeze_keeps_the_embeddings(base, tmp_path):
    d, checkpoint = base
    out = tmp_path / "frozen"
    assert main(tiny.cli_train_args(d, out, "--init-from", str(checkpoint), "--freeze", "embeddings,encoder",
                                    "--max-steps", "2", "--lr", "1e-2")) == 0
    start, end = tiny.weights(checkpoint), tiny.weights(out / "step-00000002")
    for name in start:
        same = torch.equal(start[name], end[name])
        assert same == name.startswith(("src_embed", "tgt_embed", "encoder", "generator")), name
    assert json.loads((out / "run.json").read_text())["freeze"] == ["embeddings", "encoder"]


def test_a_wrong_base_is_refused_in_one_line(base, lora_run, tmp_path, capsys):
    d, _ = base
    other = tmp_path / "other"
    assert main(tiny.cli_train_args(d, other, "--max-steps", "1")) == 0
    err = _error(capsys, "translate", "--model", str(other), "--adapter", str(lora_run), "the red dog")
    assert "trained on another base model" in err
    err = _error(capsys, "merge", str(other), "--adapter", str(lora_run), "--out", str(tmp_path / "m"))
    assert "another base model" in err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra, message", [
    (("--lora-rank", "2"), "--init-from"),
    (("--freeze", "encoder"), "--init-from"),
    (("--lora-alpha", "2"), "need --lora-rank"),
    (("INIT", "--lora-rank", "0"), "rank"),
    (("INIT", "--lora-rank", "2", "--lora-targets", "q,x"), "unknown LoRA target"),
    (("INIT", "--freeze", "wings"), "unknown part"),
    (("INIT", "--freeze", "embeddings,encoder,decoder"), "nothing to train"),
    (("INIT", "--lora-rank", "2", "--freeze", "encoder"), "drop --freeze"),
])
def test_fine_tuning_requests_that_cannot_be_met_are_one_line_errors(base, tmp_path, capsys, extra, message):
    d, checkpoint = base
    extra = [str(a) for a in extra]
    if extra[0] == "INIT":
        extra = ["--init-from", str(checkpoint), *extra[1:]]
    err = _error(capsys, *tiny.cli_train_args(d, tmp_path / "run", "--max-steps", "1", *extra))
    assert message in err


def test_adapter_errors_are_one_line(base, lora_run, tmp_path, capsys):
    _, checkpoint = base
    assert "no such adapter" in _error(capsys, "translate", "--model", str(checkpoint), "--adapter",
                                       str(tmp_path / "nowhere"), "a dog")
    assert "one --model" in _error(capsys, "translate", "--model", str(checkpoint), "--model", str(checkpoint),
                                   "--adapter", str(lora_run), "a dog")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    assert "not an aiayn LoRA adapter" in _error(capsys, "translate", "--model", str(checkpoint), "--adapter",
                                                 str(bad), "a dog")


# ------------------------------------------------------------------------------ language models
TEXT = "".join(f"{w} is a word of the text, line {i % 7}.\n" for i, w in enumerate(["ROMEO", "JULIET"] * 40))
TINY_LM = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--context", "16", "--batch-size", "4",
           "--quiet", "--precision", "fp32"]


def test_a_language_model_fine_tunes_with_lora_on_its_own_characters(tmp_path, capsys):
    data, captions = tmp_path / "text.txt", tmp_path / "captions.txt"
    data.write_text(TEXT, encoding="utf-8")
    captions.write_text("".join(f"a word is a line of the text.\nWITH 9 Unknown Q{i}\n" for i in range(60)))
    base = tmp_path / "base"
    assert main(["train", "lm", "--data", str(data), "--max-steps", "4", "--eval-every", "4", "--out", str(base),
                 *TINY_LM]) == 0
    run = tmp_path / "ft"
    capsys.readouterr()
    assert main(["train", "lm", "--init-from", str(base), "--data", str(captions), "--lora-rank", "2",
                 "--max-steps", "3", "--eval-every", "3", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "60 of 121 lines have characters outside the model's vocabulary" in err
    assert json.loads((run / "run.json").read_text())["model"]["max_len"] == 16  # the base's shape
    gen = ["generate", "--prompt", "a w", "-n", "20", "--seed", "1", "--precision", "fp32"]
    tuned = _out(capsys, *gen, "--model", str(base), "--adapter", str(run / ADAPTER_FILE))
    assert tuned == _out(capsys, *gen, "--model", str(run))
    assert "--n-layers" in _error(capsys, "train", "lm", "--init-from", str(base), "--n-layers", "2",
                                  "--out", str(tmp_path / "x"), "--quiet")
    assert "reads at most 16" in _error(capsys, "train", "lm", "--init-from", str(base), "--context", "64",
                                        "--out", str(tmp_path / "x"), "--quiet")
    assert "no such adapter" in _error(capsys, *gen, "--model", str(base), "--adapter", str(tmp_path / "nope"))
