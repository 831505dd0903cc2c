"""The models shipped inside the package load and do their job."""

from aiayn.checkpoint import load_model_dir
from aiayn.cli import _default_model_dir, main
from aiayn.translate import translate


def test_shipped_translation_model_translates_english_to_german():
    model, tokenizer, task, extra = load_model_dir(_default_model_dir("en-de"))
    assert task == "translation" and (extra["src"], extra["tgt"]) == ("en", "de")
    out = translate(model, tokenizer, ["A man is riding a bicycle down the street.", "A dog runs on the beach."],
                    beam=4)
    assert "Mann" in out[0] and "Fahrrad" in out[0]
    assert "Hund" in out[1] and "Strand" in out[1]


def test_translate_command_uses_the_shipped_model_by_default(capsys):
    assert main(["translate", "Two children are playing in the park."]) == 0
    out = capsys.readouterr().out.strip()
    assert "Kinder" in out


def test_shipped_language_model_writes_shakespeare(capsys):
    import torch

    from aiayn.config import TrainConfig
    from aiayn.data.corpus import SHAKESPEARE, read_text
    from aiayn.tasks.lm import LMTask

    model, tokenizer, task, _ = load_model_dir(_default_model_dir("shakespeare-char"))
    assert task == "lm"
    lm = LMTask.from_text(read_text(SHAKESPEARE), tokenizer, 64, model.cfg.max_len)
    with torch.no_grad():  # the whole validation text (last 10%), as training reported it: 1.498
        val_loss = lm.validate(model.eval(), TrainConfig(max_steps=1))["val_loss"]
    assert val_loss <= 1.50  # issue 4's target for the shipped model
    assert main(["generate", "--prompt", "ROMEO:", "-n", "40", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
