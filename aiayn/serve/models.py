"""The models a server holds, loaded once, and the work it runs on them in its worker thread.

Everything here calls the library (aiayn.translate, aiayn.tasks.lm, aiayn.explain); the routes in
app.py only check input and shape output.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aiayn.capability import choose_precision
from aiayn.errors import InputError

SERVE_PRECISIONS = ("auto", "fp32", "int8", "bf16")


def decode_precision(requested: str | None, default: str = "auto", device: str = "cpu") -> str:
    """The precision a request decodes in: its own if given, else the server's; "auto" becomes what
    the machine computes natively (aiayn.capability: bf16 where it has bf16 instructions, else fp32),
    and a precision it lacks is a ValueError of one line (bf16 on an AVX2-only CPU)."""
    precision = default if requested is None else requested
    if precision not in SERVE_PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(SERVE_PRECISIONS)}, got {precision!r}")
    return choose_precision(precision, device, "decode")[0]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the server queues."""
    max_body_bytes: int = 256 * 1024
    max_chars: int = 5000            # characters per text (translation) or prompt
    max_texts: int = 64              # texts per translation request
    max_new_tokens: int = 1000       # generation
    max_beam: int = 8
    max_stop: int = 4                # stop strings per generation request
    max_queue: int = 512             # sentences waiting to be translated; more -> 503
    max_streams: int = 16            # generations at once; more -> 503
    timeout_s: float = 60.0          # per request; longer -> 503
    batch_wait_ms: float = 20.0      # dynamic batching: how long a batch gathers at most,
    batch_gap_ms: float = 2.0        # or until no request came for this long
    batch_tokens: int = 8192         # and how many tokens (source + 50, times the beam) it holds

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _InferenceCopies:
    """A served model's inference copies (aiayn.fast.inference), one per precision, made once."""

    _copies: dict = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def inference(self, precision: str) -> torch.nn.Module:
        from aiayn.fast.inference import inference_model

        with self._lock:
            if precision not in self._copies:
                self._copies[precision] = inference_model(self.model, precision)
            return self._copies[precision]


@dataclass
class TranslationModel(_InferenceCopies):
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    src: str
    tgt: str
    alpha: float                      # the model's own length penalty (aiayn average --alpha), else 0.6
    device: str = "cpu"

    def cost(self, sentence: str, beam: int) -> int:
        """What a sentence takes of a batch's token budget: as aiayn.translate counts it."""
        return (min(len(self.tokenizer.encode(sentence)), self.model.cfg.max_len - 1) + 50) * beam

    def translate_batch(self, key: tuple[int, float, str], sentences: list[str]) -> list[str]:
        """One dynamic batch: sentences of one (beam, alpha, precision). Runs in the worker thread."""
        from aiayn.translate import translate

        beam, alpha, precision = key
        return translate(self.inference(precision), self.tokenizer, sentences, beam=beam, alpha=alpha,
                         device=self.device, precision="plain")

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {"id": self.name, "task": "translation", "source": self.src, "target": self.tgt,
                "path": str(self.path), "parameters": sum(p.numel() for p in self.model.parameters()),
                "max_tokens_per_sentence": cfg.max_len - 1, "vocab_size": cfg.vocab_size,
                "layers": {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers},
                "heads": cfg.n_heads, "default_alpha": self.alpha}


@dataclass
class LanguageModel(_InferenceCopies):
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    device: str = "cpu"

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {"id": self.name, "task": "lm", "path": str(self.path),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "context": cfg.max_len, "vocab_size": cfg.vocab_size,
                "layers": {"decoder": cfg.n_decoder_layers}, "heads": cfg.n_heads}


@dataclass
class Models:
    translation: TranslationModel | None
    lm: LanguageModel | None

    @property
    def device(self) -> str:
        """Where the served models are (both on one device: load_models puts them there)."""
        return next((m.device for m in (self.translation, self.lm) if m is not None), "cpu")


def model_id(directory: str | Path) -> str:
    """A model's name in the API: its directory's, and for a run's checkpoint its run's too
    (`tiny/step-00000003`, not a bare `step-00000003`)."""
    from aiayn.checkpoint import CKPT_PREFIX

    directory = Path(directory)
    return f"{directory.parent.name}/{directory.name}" if directory.name.startswith(CKPT_PREFIX) else directory.name


def load_models(translation_dir: Path | None, lm_dir: Path | None, device: str = "cpu",
                adapters: list[str | Path] = ()) -> Models:
    """Load the models of a server (either may be None), each with the LoRA adapters of its task
    merged in (aiayn.finetune). Raises CheckpointError/InputError on a bad model directory or
    adapter, or a model of the wrong task."""
    from aiayn.checkpoint import load_model
    from aiayn.finetune import apply_adapter
    from aiayn.lora import read_adapter

    by_task: dict[str, list] = {}
    for path in adapters:
        by_task.setdefault(read_adapter(path)[0].task, []).append(path)
    for task, wanted in (("translation", translation_dir), ("lm", lm_dir)):
        if by_task.get(task) and wanted is None:
            raise InputError(f"{by_task[task][0]}: an adapter for a {task} model, and no {task} model is served")
    translation = lm = None
    if translation_dir is not None:
        model, tokenizer, extra, _ = load_model(translation_dir, "translation", device)
        for path in by_task.get("translation", []):
            extra = apply_adapter(model, extra, path, "translation")
        src, tgt = extra.get("src", "en"), extra.get("tgt", "de")
        translation = TranslationModel(model_id(translation_dir), Path(translation_dir), model, tokenizer,
                                       src, tgt, float(extra.get("alpha", 0.6)), device)
    if lm_dir is not None:
        model, tokenizer, extra, _ = load_model(lm_dir, "lm", device)
        for path in by_task.get("lm", []):
            apply_adapter(model, extra, path, "lm")
        lm = LanguageModel(model_id(lm_dir), Path(lm_dir), model, tokenizer, device)
    return Models(translation, lm)
