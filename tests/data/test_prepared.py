"""`aiayn prepare`: memory-mapped shards round-trip the tokenizer's ids; length bucketing over them
gives the in-memory batches; training from them equals training from text; bad input is one line."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from aiayn import cli
from aiayn.data.batching import token_batches
from aiayn.data.corpus import DataError
from aiayn.data.prepared import Prepared, TokenArray, iter_lines, length_batches, prepare_lm, prepare_translation
from aiayn.data.tokenizer import CharTokenizer
from aiayn.model import build_model
from aiayn.tasks.lm import LMTask, split_ids
from aiayn.tasks.translation import PreparedTranslationTask, TranslationTask
from aiayn.train.loop import Trainer

from train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def prepared(tmp_path):
    src, tgt = tiny.write_corpus(tmp_path, tiny.TRAIN, "train")
    with gzip.open(tmp_path / "val.en.gz", "wt", encoding="utf-8") as f:  # gzipped input reads the same
        f.writelines(s + "\n" for s, _ in tiny.VAL)
    _, val_tgt = tiny.write_corpus(tmp_path, tiny.VAL, "val")
    # 100 pairs a shard: three shards, the last one short
    return Prepared(prepare_translation(tmp_path / "prep", src, tgt, tmp_path / "val.en.gz", val_tgt,
                                        tiny.tokenizer(), shard_pairs=100))


def test_shards_round_trip_the_tokenizers_ids(prepared):
    pairs = prepared.pairs("train")
    assert len(prepared.meta["splits"]["train"]["shards"]) == 3 and len(pairs) == len(tiny.TRAIN)
    t = tiny.tokenizer()
    for i, (s, g) in enumerate(tiny.TRAIN):
        assert pairs[i] == (t.encode(s), t.encode(g))
    assert pairs.src_len.tolist() == [len(t.encode(s)) for s, _ in tiny.TRAIN]
    assert prepared.val_text() == tiny.VAL
    assert prepared.tokenizer().proto == t.proto
    assert all(isinstance(a, np.memmap) for a in prepared.pairs("train").shards[0])  # mapped, not read


@pytest.mark.parametrize("epoch", [0, 3])
def test_length_batches_are_the_in_memory_batches(epoch):
    rng = np.random.default_rng(epoch)
    src, tgt = rng.integers(0, 40, 500), rng.integers(0, 40, 500)
    keep = (src > 0) & (tgt > 0) & (src <= 30) & (tgt < 30)
    kept = np.flatnonzero(keep)
    pairs = [([1] * src[i], [1] * tgt[i]) for i in kept]  # the in-memory task holds the kept pairs only
    for shuffle in (True, False):
        expected = [[int(kept[i]) for i in b] for b in token_batches(pairs, 120, seed=7, epoch=epoch, shuffle=shuffle)]
        got = length_batches(src, tgt, 120, keep, seed=7, epoch=epoch, shuffle=shuffle)
        assert [b.tolist() for b in got] == expected


def test_training_from_shards_equals_training_from_text(prepared, tmp_path):
    cfg = tiny.train_config(max_steps=3, eval_every=3)
    summaries = []
    for name in ("text", "shards"):
        torch.manual_seed(cfg.seed)
        model = build_model(tiny.model_config())
        if name == "text":
            task = TranslationTask(tiny.tokenizer(), tiny.TRAIN, tiny.VAL, cfg.max_tokens, model.cfg.max_len)
        else:
            task = PreparedTranslationTask(prepared, tiny.tokenizer(), cfg.max_tokens, model.cfg.max_len, eval_bleu=False)
        trainer = Trainer(task, model, tiny.tokenizer(), cfg, tmp_path / name)
        trainer.plot = lambda: None
        summaries.append(trainer.run(progress=False))
    assert tiny.train_rows(tmp_path / "text") == tiny.train_rows(tmp_path / "shards")
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
    tiny.assert_same_weights(tiny.weights(tmp_path / "text" / "step-00000003"),
                             tiny.weights(tmp_path / "shards" / "step-00000003"))


def test_lm_tokens_round_trip_and_index_like_a_tensor(tmp_path):
    text = "".join(f"{s}\n" for s, _ in tiny.TRAIN[:50])
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer.train([text])
    p = Prepared(prepare_lm(tmp_path / "lm", tmp_path / "t.txt", tok), "lm")
    train, val = split_ids(torch.tensor(tok.encode(text)))
    assert p.tokens("train").array.tolist() == train.tolist() and p.tokens("val").array.tolist() == val.tolist()
    a, b = LMTask(p.tokens("train"), p.tokens("val"), 4, 8), LMTask(train, val, 4, 8)
    starts = a.epoch_batches(0, 1)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.windows(starts), b.windows(starts)))
    assert isinstance(p.tokens("train"), TokenArray) and a.windows(starts)[0].dtype == torch.long


def test_bad_input_is_one_clear_error(tmp_path, prepared, capsys):
    src, tgt = tiny.write_corpus(tmp_path, tiny.TRAIN, "train")
    short = tmp_path / "short.xx"
    short.write_text("eins\n", encoding="utf-8")
    with pytest.raises(DataError, match="more lines"):
        prepare_translation(tmp_path / "p2", src, short, src, tgt, tiny.tokenizer())
    assert not (tmp_path / "p2").exists() and not list(tmp_path.glob("*.tmp-prepare"))
    with pytest.raises(DataError, match="not empty"):
        prepare_translation(prepared.dir, src, tgt, src, tgt, tiny.tokenizer())
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="bad.txt, line 2: invalid UTF-8"):
        list(iter_lines(tmp_path / "bad.txt"))
    with pytest.raises(DataError, match="prepared for translation, not lm"):
        Prepared(prepared.dir, "lm")
    meta = json.loads((prepared.dir / "prepared.json").read_text())
    (prepared.dir / "prepared.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        Prepared(prepared.dir)
    assert cli.main(["train", "translation", "--prepared", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) != 0
    assert "not a prepared corpus" in capsys.readouterr().err
    assert cli.main(["prepare", "translation", "--train-src", str(src), "--out", str(tmp_path / "p3")]) == 2
    assert "give --train-src, --train-tgt" in capsys.readouterr().err


def test_the_commands_prepare_train_and_resume(tmp_path):
    src, tgt = tiny.write_corpus(tmp_path, tiny.TRAIN, "train")
    val_src, val_tgt = tiny.write_corpus(tmp_path, tiny.VAL, "val")
    tiny.tokenizer().save(tmp_path)  # --tokenizer reuses a directory's tokenizer
    prep, run = tmp_path / "prep", tmp_path / "run"
    assert cli.main(["prepare", "translation", "--train-src", str(src), "--train-tgt", str(tgt), "--val-src",
                     str(val_src), "--val-tgt", str(val_tgt), "--tokenizer", str(tmp_path), "--out", str(prep)]) == 0
    train = ["train", "translation", "--prepared", str(prep), "--preset", "tiny", "--max-tokens", "256",
             "--precision", "fp32", "--eval-every", "2", "--log-every", "1", "--quiet", "--out", str(run)]
    assert cli.main([*train, "--max-steps", "2"]) == 0
    assert json.loads((run / "run.json").read_text())["prepared"] == str(prep.resolve())
    assert cli.main(["train", "translation", "--resume", "--max-steps", "3", "--quiet", "--out", str(run)]) == 0
    assert [r[0] for r in tiny.train_rows(run)] == [1, 2, 3]
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{s}\n" for s, _ in tiny.TRAIN[:60]), encoding="utf-8")
    assert cli.main(["prepare", "lm", "--data", str(text), "--out", str(tmp_path / "lm")]) == 0
    assert cli.main(["train", "lm", "--prepared", str(tmp_path / "lm"), "--n-layers", "1", "--d-model", "32",
                     "--n-heads", "2", "--context", "16", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
                     "--precision", "fp32", "--quiet", "--out", str(tmp_path / "lmrun")]) == 0
