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

    from aiayn.data.corpus import SHAKESPEARE, read_text
    from aiayn.tasks.lm import encode_text, lm_loss, split_ids

    model, tokenizer, task, _ = load_model_dir(_default_model_dir("shakespeare-char"))
    assert task == "lm"
    _, val = split_ids(encode_text(tokenizer, read_text(SHAKESPEARE)))
    T = model.cfg.max_len
    windows = val[:32 * T + 1]
    with torch.no_grad():  # the held-out text: a trained model, not an untrained one (~4.2)
        assert lm_loss(model, windows[:-1].view(32, T), windows[1:].view(32, T)).item() < 1.7
    assert main(["generate", "--prompt", "ROMEO:", "-n", "40", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
