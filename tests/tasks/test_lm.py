"""The language-modelling task: batches are a pure function of (seed, epoch), targets are the inputs
shifted by one, validation is deterministic, a tiny LM learns a repetitive text; streaming text
stops exactly at stop strings."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from aiayn.config import ModelConfig
from aiayn.data.corpus import DataError
from aiayn.data.tokenizer import BPETokenizer, CharTokenizer
from aiayn.model import LanguageModel
from aiayn.tasks.lm import PRESETS, LMTask, lm_config, lm_loss, prompt_ids, split_ids, stream_text
from aiayn.train.loop import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _task(n_train=1000, n_val=200, batch_size=4, context=8) -> LMTask:
    ids = torch.randint(4, 50, (n_train + n_val,), generator=torch.Generator().manual_seed(0))
    return LMTask(ids[:n_train], ids[n_train:], batch_size, context)


def test_batches_are_a_pure_function_of_seed_and_epoch():
    task = _task()
    first = task.epoch_batches(epoch=0, seed=1)
    assert len(first) == 1000 // (4 * 8)  # an epoch: about one pass over the training tokens
    assert all(b.shape == (4,) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, _task().epoch_batches(epoch=0, seed=1)))
    assert not torch.equal(torch.stack(first), torch.stack(task.epoch_batches(epoch=1, seed=1)))
    assert not torch.equal(torch.stack(first), torch.stack(task.epoch_batches(epoch=0, seed=2)))


def test_windows_are_context_tokens_and_targets_are_shifted_by_one():
    task = _task()
    starts = torch.cat(task.epoch_batches(0, 1))
    assert starts.min() >= 0 and starts.max() + task.context + 1 <= len(task.train)  # every window fits
    x, y = task.windows(starts[:4])
    assert x.shape == y.shape == (4, 8)
    for b, s in enumerate(starts[:4].tolist()):
        assert torch.equal(x[b], task.train[s:s + 8]) and torch.equal(y[b], task.train[s + 1:s + 9])
    # the last possible window is reachable, one more is not: starts come from [0, len - context)
    x, y = task.windows(torch.tensor([len(task.train) - 9]))
    assert y[0, -1] == task.train[-1]


def test_validation_reads_the_val_text_once_in_order():
    task = _task(n_val=201, context=8)
    assert task.val_starts.tolist() == list(range(0, 200, 8))  # (201 - 1) // 8 = 25 windows
    torch.manual_seed(0)
    model = LanguageModel(lm_config(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_decoder_layers=1,
                                    max_len=8)).eval()
    result = task.validate(model, PRESETS["shakespeare-cpu"][1])
    x, y = task.val[:200].view(25, 8), task.val[1:201].view(25, 8)
    with torch.no_grad():
        expected = lm_loss(model, x, y).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val_ppl"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert task.validate(model, PRESETS["shakespeare-cpu"][1]) == result


def test_validation_takes_several_batches_a_pass_within_its_bounds(monkeypatch):
    """The windows go through the model in passes of up to VAL_TOKENS tokens and VAL_LOGITS logits,
    never fewer than one batch's: the loss is the same however they are grouped."""
    import aiayn.tasks.lm as lm

    task = _task(n_val=201, batch_size=2, context=8)  # 25 windows
    torch.manual_seed(0)
    model = LanguageModel(lm_config(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_decoder_layers=1,
                                    max_len=8)).eval()
    passes = []
    monkeypatch.setattr(model, "forward", lambda x, _f=model.forward: passes.append(len(x)) or _f(x))
    cfg = PRESETS["shakespeare-cpu"][1]
    losses = {}
    for tokens, logits, expected in ((8192, 2 ** 25, [25]), (80, 2 ** 25, [10, 10, 5]), (8192, 50 * 8, [2] * 12 + [1])):
        monkeypatch.setattr(lm, "VAL_TOKENS", tokens), monkeypatch.setattr(lm, "VAL_LOGITS", logits)
        passes.clear()
        losses[tokens, logits] = task.validate(model, cfg)["val_loss"]
        assert passes == expected
    assert max(losses.values()) - min(losses.values()) < 1e-5 * min(losses.values())


def test_a_text_shorter_than_a_window_is_a_data_error():
    with pytest.raises(DataError, match="validation part of the text has 5 tokens"):
        LMTask(torch.arange(100), torch.arange(5), batch_size=2, context=8)


def test_split_is_first_90_percent_then_last_10():
    train, val = split_ids(torch.arange(100))
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_a_tiny_lm_learns_a_repetitive_text(tmp_path):
    text = "the cat sat on the mat. " * 60
    tok = CharTokenizer.train([text])
    model_cfg, train_cfg = PRESETS["shakespeare-cpu"]
    train_cfg = train_cfg.replace(max_steps=80, warmup=10, lr=1e-2, min_lr=1e-3, batch_size=8, context=16,
                                  eval_every=80, precision="fp32")
    torch.manual_seed(0)
    model = LanguageModel(model_cfg.replace(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=64,
                                            n_decoder_layers=1, max_len=16))
    task = LMTask.from_text(text, tok, train_cfg.batch_size, train_cfg.context)
    before = task.validate(model, train_cfg)["val_loss"]
    summary = Trainer(task, model, tok, train_cfg, tmp_path / "run").run(progress=False)
    assert before > 2.0
    assert summary["val_loss"] < 0.3  # the text is predictable but for the first tokens of a window


# ------------------------------------------------------------------------------------- streaming
@dataclass
class _Cache:
    length: int = 0


class NextLetter(nn.Module):
    """A fake language model: it always predicts the letter after the last token it was fed."""

    def __init__(self, tokenizer: CharTokenizer, max_len: int = 64):
        super().__init__()
        self.tok = tokenizer
        self.cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_encoder_layers=0, max_len=max_len)
        self.dummy = nn.Parameter(torch.zeros(()))

    def init_cache(self, batch, max_len, device=None, dtype=None):
        return _Cache()

    def decode_step(self, tokens, cache):
        cache.length += tokens.size(1)
        letters = self.tok.chars[1:]  # after the newline: "abcdefgh"
        nxt = [self.tok.index[letters[(letters.index(c) + 1) % len(letters)] if c in letters else "a"]
               for c in self.tok.decode(tokens[:, -1].tolist())]
        logits = torch.full((tokens.size(0), tokens.size(1), self.cfg.vocab_size), -10.0)
        logits[torch.arange(tokens.size(0)), -1, torch.tensor(nxt)] = 10.0
        return logits


@pytest.fixture
def next_letter():
    tok = CharTokenizer("\nabcdefgh")
    return NextLetter(tok), tok


def _stream(next_letter, prompt, n, stop=()):
    model, tok = next_letter
    return list(stream_text(model, tok, prompt, n, temperature=0, stop=stop))


def test_stream_yields_the_continuation(next_letter):
    assert "".join(_stream(next_letter, "c", 10)) == "defghabcde"
    assert _stream(next_letter, "c", 3) == ["d", "e", "f"]  # one piece per token: streamed
    assert _stream(next_letter, "c", 0) == []


def test_an_empty_prompt_starts_from_a_newline(next_letter):
    _, tok = next_letter
    assert prompt_ids(tok, "") == tok.encode("\n")
    assert "".join(_stream(next_letter, "", 3)) == "abc"  # the model sees "\n", then goes on from "a"


def test_stop_strings_end_generation_before_them(next_letter):
    assert "".join(_stream(next_letter, "c", 20, stop=["gh"])) == "def"
    assert "".join(_stream(next_letter, "c", 20, stop=["xyz", "ab", "fg"])) == "de"  # the first one hit
    assert "".join(_stream(next_letter, "c", 20, stop=["d"])) == ""
    # text that may begin a stop string is held back, then released when it does not
    pieces = _stream(next_letter, "a", 6, stop=["cdx"])
    assert pieces == ["b", "cde", "f", "g"]
    assert "".join(_stream(next_letter, "a", 4, stop=["dex"])) == "bcde"  # held back to the end, then out



class Scripted(NextLetter):
    """A fake language model that says the given token ids, in order, whatever it is fed."""

    def __init__(self, script: list[int], vocab_size: int):
        nn.Module.__init__(self)
        self.script = script
        self.cfg = ModelConfig(vocab_size=vocab_size, n_encoder_layers=0, max_len=64)
        self.dummy = nn.Parameter(torch.zeros(()))

    def init_cache(self, batch, max_len, device=None, dtype=None):
        self.calls = 0
        return _Cache()

    def decode_step(self, tokens, cache):
        logits = torch.zeros(tokens.size(0), tokens.size(1), self.cfg.vocab_size)
        logits[:, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return logits


def test_streamed_bpe_pieces_add_up_to_the_decoded_continuation():
    text = "".join(f"the cat number {i} sat on the mat, said the dog.\n" for i in range(200))
    tok = BPETokenizer.train(text.split("\n"), 300)
    prompt = "the cat"
    script = tok.encode("sat on the mat\nthé ☃ dog")  # "▁sat ...": é and ☃ are not in the text: bytes
    assert len(tok.pieces(script)) > 12 and "<0xE2>" in tok.pieces(script)
    pieces = list(stream_text(Scripted(script, tok.vocab_size), tok, prompt, len(script), temperature=0))
    assert prompt + "".join(pieces) == tok.decode(tok.encode(prompt) + script) == "the cat sat on the mat\nthé ☃ dog"
    assert pieces[0] == " s"  # "▁s": its space is kept, though decoding it alone would drop it
    assert "\ufffd" not in "".join(pieces)  # a character split into bytes comes out whole
