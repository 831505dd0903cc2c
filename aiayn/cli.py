"""The `aiayn` command. Thin: it parses arguments and calls library functions.

Every user mistake (a bad path, a bad argument, corrupt data) ends in one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from aiayn.errors import InputError

EXIT_USAGE, EXIT_ERROR = 2, 1
DECODE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEVICE_HELP = "cpu (default), cuda or cuda:N: where the model runs (a GPU needs a CUDA build of torch)"
DECODE_PRECISION_HELP = ("auto (default): bf16 where the device computes it natively (CUDA; CPUs with "
                         "AVX512_BF16, AMX or ARM BF16 measured faster), else fp32; fp32; bf16; fp16 (GPU); "
                         "int8 (CPU: dynamically quantized linears)")
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o")  # aiayn.lora.DEFAULT_TARGETS (not imported: cli imports lazily)


class UserError(InputError):
    """A mistake in the command line itself; printed as one line, exit status 2."""


# -------------------------------------------------------------------------------------- train
def _train_config(args, **defaults):
    """A TrainConfig of the defaults and every option of the command that names one of its fields."""
    import dataclasses

    from aiayn.config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    merged = {**defaults, **given}
    if not any(merged.get(k) is not None for k in ("max_steps", "max_epochs", "max_minutes", "max_cpu_minutes")):
        merged["max_epochs"] = defaults.get("max_epochs", 1)
    return TrainConfig(**merged)


def _check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is available")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _resume_settings(args, task: str) -> dict | None:
    """On --resume, the settings of the run in --out (aiayn.train.runs), a run of `task`; else None."""
    from aiayn.train.runs import read_settings

    if not args.resume:
        return None
    settings = read_settings(args.out)
    if settings and settings.get("task") != task:
        raise UserError(f"{args.out} holds a {settings.get('task')} run, not a {task} run: resume it with "
                        f"aiayn train {settings.get('task')}")
    return settings


def _resumed_run(args, previous: dict):
    """-> (model config, TrainConfig) of the run to resume, with this command's stopping point and
    precision (aiayn.train.runs.resumed)."""
    from aiayn.train.runs import STOPS, resumed

    cfg, tcfg, note = resumed(args.out, previous, {k: getattr(args, k, None) for k in STOPS}, args.precision)
    if note:
        _say(f"aiayn: {note}")
    return cfg, tcfg


def _distributed(args):
    """Under torchrun: this rank's Parallel and device (aiayn.train.distributed); else (None, device)."""
    from aiayn.train.distributed import init

    parallel, args.device = init(args.distributed, args.device)
    return parallel


def _say(*args) -> None:
    """A line on stderr, from rank 0 only when several processes train."""
    from aiayn.train.distributed import is_main

    if is_main():
        print(*args, file=sys.stderr)


def _run_trainer(trainer, args) -> dict | None:
    """The run's summary; None on ranks other than 0."""
    from aiayn.train.distributed import close

    finished = False
    try:
        summary = trainer.run(resume=args.resume, progress=not args.quiet)
        finished = True
        return summary if trainer.main else None
    finally:
        close(finished)


def cmd_train_translation(args) -> int:
    from aiayn.config import preset
    from aiayn.data.corpus import multi30k, read_parallel
    from aiayn.data.tokenizer import BPETokenizer
    from aiayn.model import build_model
    from aiayn.tasks.translation import TranslationTask
    from aiayn.train.distributed import from_main
    from aiayn.train.loop import Trainer
    from aiayn.train.runs import newest_tokenizer

    _check_device(args.device)
    parallel = _distributed(args)
    _finetune_request(args)
    previous = _resume_settings(args, "translation")
    files = ("train_src", "train_tgt", "val_src", "val_tgt")
    if previous:  # the run's own data and languages, unless given again (e.g. files that moved)
        for name in files:
            if getattr(args, name) is None:
                setattr(args, name, previous.get(name))
        args.src, args.tgt = previous.get("src", args.src), previous.get("tgt", args.tgt)
        args.prepared = args.prepared or previous.get("prepared")
    if bool(args.train_src) != bool(args.train_tgt) or bool(args.val_src) != bool(args.val_tgt):
        raise UserError("give both --train-src and --train-tgt (and both --val-src and --val-tgt)")
    prepared = None
    if args.prepared:  # a corpus from `aiayn prepare`: streamed from memory-mapped shards
        from aiayn.data.prepared import Prepared

        if args.train_src or args.init_from:
            raise UserError("--prepared holds the training data and its vocabulary: without --train-src/"
                            "--train-tgt and --init-from")
        prepared = Prepared(args.prepared, "translation")
        train, val = [], []
    elif args.train_src:
        train = read_parallel(args.train_src, args.train_tgt)
        if not args.val_src:
            raise UserError("with your own training data, also give --val-src and --val-tgt")
        val = read_parallel(args.val_src, args.val_tgt)
    else:
        train, val = multi30k("train", args.src, args.tgt), multi30k("val", args.src, args.tgt)
    out = Path(args.out)
    init = None
    if previous:
        mcfg, tcfg = _resumed_run(args, previous)
        tokenizer = newest_tokenizer(args.out)
    else:
        _choose_precision(args, "train")
        tcfg = _train_config(args, lr=1e-3, warmup=1000, max_tokens=4096,
                             eval_every=500, log_every=50)
        overrides = {k: v for k, v in (("dropout", args.dropout), ("norm_first", args.norm_first or None))
                     if v is not None}
        if args.init_from:  # fine-tuning: the trained model's weights, shape and vocabulary
            from aiayn.finetune import load_base

            if args.norm_first:
                raise UserError("--norm-first changes the layers of the model given by --init-from")
            init, tokenizer, _ = load_base(args.init_from, "translation")
            mcfg = init.cfg.replace(**overrides)
            print(f"starting from {args.init_from} (its shape and vocabulary; --preset and --vocab-size "
                  "do not apply)", file=sys.stderr)
        elif prepared is not None:
            tokenizer = prepared.tokenizer()
            mcfg = preset(args.preset, vocab_size=tokenizer.vocab_size, tgt_vocab_size=None, **overrides)
        else:
            _say(f"training a {args.vocab_size}-token joint BPE vocabulary on {len(train):,} sentence pairs")
            # several ranks: learned once, on rank 0
            tokenizer = BPETokenizer(from_main(
                lambda: BPETokenizer.train([x for pair in train for x in pair], args.vocab_size).proto))
            mcfg = preset(args.preset, vocab_size=tokenizer.vocab_size, tgt_vocab_size=None, **overrides)
    import torch

    if parallel is not None:  # each rank on its own GPU (a resumed run's settings name rank 0's)
        tcfg = tcfg.replace(device=parallel.device)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    extra = _finetune_model(args, model, "translation", previous, {"src": args.src, "tgt": args.tgt})
    if prepared is not None:
        from aiayn.tasks.translation import PreparedTranslationTask

        task = PreparedTranslationTask(prepared, tokenizer, tcfg.max_tokens, mcfg.max_len, tcfg.device, tcfg.eval_bleu)
        extra["prepared"] = str(Path(args.prepared).resolve())
    else:
        task = TranslationTask(tokenizer, train, val, tcfg.max_tokens, mcfg.max_len, tcfg.device, tcfg.eval_bleu)
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"model: {n_params / 1e6:.1f}M parameters; {len(task.train):,} training pairs; run directory {out}")
    paths = {name: str(Path(getattr(args, name)).resolve()) for name in files if getattr(args, name)}
    trainer = Trainer(task, model, tokenizer, tcfg, out,
                      extra_meta={"src": args.src, "tgt": args.tgt, **paths, **extra}, parallel=parallel)
    summary = _run_trainer(trainer, args)
    if summary is not None:
        _finish_finetune(out, extra)
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0


def cmd_prepare_translation(args) -> int:
    from aiayn.data.corpus import multi30k_path
    from aiayn.data.prepared import iter_pairs, prepare_translation
    from aiayn.data.tokenizer import BPETokenizer, load_tokenizer

    files = [args.train_src, args.train_tgt, args.val_src, args.val_tgt]
    if any(files) and not all(files):
        raise UserError("give --train-src, --train-tgt, --val-src and --val-tgt (or none: Multi30k)")
    if not any(files):
        files = [multi30k_path(split, lang) for split in ("train", "val") for lang in (args.src, args.tgt)]
    if args.tokenizer:
        tokenizer = load_tokenizer(Path(args.tokenizer))
    else:
        print(f"training a {args.vocab_size}-token joint BPE vocabulary on {files[0]} and {files[1]}", file=sys.stderr)
        sentences = (x for pair in iter_pairs(files[0], files[1]) for x in pair)
        tokenizer = BPETokenizer.train(sentences, args.vocab_size)  # sentencepiece samples 2M sentences
    out = prepare_translation(args.out, *files, tokenizer)
    print(json.dumps(json.loads((out / "prepared.json").read_text())["splits"]))
    return 0


def cmd_prepare_lm(args) -> int:
    from aiayn.data.corpus import SHAKESPEARE
    from aiayn.data.prepared import iter_lines, prepare_lm
    from aiayn.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

    data = args.data or SHAKESPEARE
    if args.tokenizer_from and args.tokenizer:
        raise UserError("--tokenizer-from reuses a tokenizer: give it or --tokenizer, not both")
    if args.tokenizer_from:
        tokenizer = load_tokenizer(Path(args.tokenizer_from))
    elif args.tokenizer in (None, "char"):  # every character of the text (one pass), as aiayn train lm
        chars = {"\n"}
        for line in iter_lines(data):
            chars.update(line)
        tokenizer = CharTokenizer.train(["".join(chars)])
    else:
        tokenizer = BPETokenizer.train((line for line in iter_lines(data) if line.strip()), args.vocab_size)
    out = prepare_lm(args.out, data, tokenizer)
    print(json.dumps(json.loads((out / "prepared.json").read_text())["splits"]))
    return 0


def _finetune_model(args, model, task: str, previous: dict | None, model_extra: dict) -> dict:
    """--init-from's model made trainable as asked (--freeze, --lora-*), or a resumed run's as it
    was (aiayn.finetune) -> what run.json and the checkpoints record of it."""
    from aiayn import finetune

    if previous:
        finetune.prepare_resumed(model, previous)
        extra = {k: previous[k] for k in ("init_from", "freeze", "lora") if k in previous}
    else:
        lora_cfg, freeze_parts = _finetune_request(args)
        extra = finetune.prepare(model, task, init_from=args.init_from, freeze_parts=freeze_parts,
                                 lora_cfg=lora_cfg, extra=model_extra, seed=getattr(args, "seed", None) or 1)
    if "init_from" in extra:
        print(f"fine-tuning{' with LoRA' if 'lora' in extra else ''}: {finetune.describe(model)}", file=sys.stderr)
    return extra


def _finetune_request(args):
    """--init-from (not with --resume), --lora-* and --freeze, checked before any work -> (LoRAConfig or
    None, parts to freeze)."""
    from aiayn.finetune import parse_freeze
    from aiayn.lora import LoRAConfig, parse_targets

    if args.init_from and args.resume:
        raise UserError("--init-from starts a new run from a trained model; --resume continues one: give one")
    if args.resume:
        return None, ()
    lora_cfg = None
    rank, alpha = getattr(args, "lora_rank", None), getattr(args, "lora_alpha", None)
    targets = getattr(args, "lora_targets", ",".join(DEFAULT_LORA_TARGETS))
    if rank is not None:
        lora_cfg = LoRAConfig(rank=rank, alpha=alpha, targets=parse_targets(targets))
    elif alpha is not None or targets != ",".join(DEFAULT_LORA_TARGETS):
        raise UserError("--lora-alpha and --lora-targets need --lora-rank")
    freeze_parts = parse_freeze(args.freeze)
    if (lora_cfg is not None or freeze_parts) and not args.init_from:
        raise UserError("--lora-rank and --freeze fine-tune a trained model: give --init-from MODEL")
    if lora_cfg is not None and freeze_parts:
        raise UserError("LoRA trains its adapters only (everything else is frozen): drop --freeze")
    return lora_cfg, freeze_parts


def _finish_finetune(out: Path, extra: dict) -> None:
    if "lora" in extra:
        from aiayn.finetune import finish

        path = finish(out)
        if path is not None:
            print(f"aiayn: adapter of the best checkpoint: {path} ({path.stat().st_size / 1024:.0f} KB)",
                  file=sys.stderr)


def cmd_train_lm(args) -> int:
    import torch

    from aiayn.data.corpus import SHAKESPEARE, read_text
    from aiayn.finetune import fit_text, load_base
    from aiayn.model import build_model
    from aiayn.data.tokenizer import BPETokenizer
    from aiayn.tasks.lm import PRESETS, LMTask, train_tokenizer
    from aiayn.train.distributed import from_main
    from aiayn.train.loop import Trainer
    from aiayn.train.runs import newest_tokenizer

    _check_device(args.device)
    parallel = _distributed(args)
    out = Path(args.out)
    _finetune_request(args)
    previous = _resume_settings(args, "lm")
    prepared = None
    if args.prepared or (previous or {}).get("prepared"):  # tokens from `aiayn prepare`, memory-mapped
        from aiayn.data.prepared import Prepared

        if args.data:
            raise UserError("--prepared holds the text already: without --data")
        prepared = Prepared(args.prepared or previous["prepared"], "lm")
    init = None
    if previous:
        mcfg, tcfg = _resumed_run(args, previous)
        tokenizer = newest_tokenizer(args.out)
        # the run's own text, unless --data says where it is now (the same text, moved)
        data, kind = str(args.data or previous["data"]), previous["tokenizer"]
        if prepared is None and not args.data and not Path(data).is_file():
            raise UserError(f"{data}: this run's training text is gone; give its new place with --data")
        text = read_text(data) if prepared is None else None
        if text is not None and "init_from" in previous:
            text = fit_text(text, tokenizer)
    elif args.init_from:  # fine-tuning: the trained model's weights, shape and tokenizer
        if prepared is not None:
            raise UserError("--prepared holds its own vocabulary: without --init-from")
        init, tokenizer, _ = load_base(args.init_from, "lm")
        mcfg = init.cfg
        ignored = [o for o in ("n_layers", "n_heads", "d_model", "d_ff", "positional") if getattr(args, o) is not None]
        if ignored or args.post_norm or args.tokenizer != "char":
            raise UserError("--init-from keeps the model's shape and tokenizer: drop --"
                            + ", --".join(o.replace("_", "-") for o in ignored or ["tokenizer"]))
        if args.context is not None and args.context > mcfg.max_len:
            raise UserError(f"--context {args.context}: the model reads at most {mcfg.max_len} tokens")
        if args.dropout is not None:
            mcfg = mcfg.replace(dropout=args.dropout, attn_dropout=args.dropout)
        _choose_precision(args, "train")
        recipe = {**PRESETS[args.preset][1].to_dict(), "context": mcfg.max_len, "max_steps": 500, "warmup": 50,
                  "eval_every": 100, "lr": 1e-3 if args.lora_rank else 3e-4}
        recipe["min_lr"] = (args.lr or recipe["lr"]) / 10
        tcfg = _train_config(args, **recipe)
        data, kind = str(args.data or SHAKESPEARE), "init-from"
        text = fit_text(read_text(data), tokenizer)
        print(f"starting from {args.init_from} (its shape and tokenizer)", file=sys.stderr)
    else:
        model_preset, train_preset = PRESETS[args.preset]
        _choose_precision(args, "train")
        tcfg = _train_config(args, **train_preset.to_dict())
        data, kind = str(args.data or SHAKESPEARE), args.tokenizer
        text = read_text(data) if prepared is None else None
        if prepared is not None:
            tokenizer = prepared.tokenizer()
            data, kind = str(prepared.dir.resolve()), prepared.meta["tokenizer"]
        elif kind == "bpe":  # several ranks: learned once, on rank 0
            _say(f"training a {args.vocab_size}-token BPE vocabulary on {data}")
            tokenizer = BPETokenizer(from_main(lambda: train_tokenizer(kind, text, args.vocab_size).proto))
        else:
            tokenizer = train_tokenizer(kind, text, args.vocab_size)
        shape = {k: v for k, v in (("n_decoder_layers", args.n_layers), ("n_heads", args.n_heads),
                                   ("d_model", args.d_model), ("d_ff", args.d_ff), ("dropout", args.dropout),
                                   ("attn_dropout", args.dropout), ("positional", args.positional)) if v is not None}
        if args.d_model is not None and args.d_ff is None:
            shape["d_ff"] = 4 * args.d_model
        if args.post_norm:
            shape["norm_first"] = False
        mcfg = model_preset.replace(vocab_size=tokenizer.vocab_size, max_len=tcfg.context, **shape)
    if parallel is not None:  # each rank on its own GPU (a resumed run's settings name rank 0's)
        tcfg = tcfg.replace(device=parallel.device)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    extra = _finetune_model(args, model, "lm", previous, {})
    if prepared is not None:
        task = LMTask(prepared.tokens("train"), prepared.tokens("val"), tcfg.batch_size, tcfg.context, tcfg.device)
    else:
        task = LMTask.from_text(text, tokenizer, tcfg.batch_size, tcfg.context, tcfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"model: {n_params / 1e6:.2f}M parameters; {len(task.train):,} training and {len(task.val):,} "
         f"validation tokens ({kind}, {tokenizer.vocab_size} types); run directory {out}")
    meta = {"data": data, "tokenizer": kind, **({"prepared": data} if prepared is not None else {}), **extra}
    trainer = Trainer(task, model, tokenizer, tcfg, out, extra_meta=meta, parallel=parallel)
    summary = _run_trainer(trainer, args)
    if summary is not None:
        _finish_finetune(out, extra)
        print(json.dumps(summary, default=str))
    return 0


# ----------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    import torch

    from aiayn.checkpoint import load_model
    from aiayn.fast.inference import inference_model
    from aiayn.tasks.lm import stream_text

    for bad, message in ((args.max_new_tokens < 0, "--max-new-tokens must be >= 0"),
                         (args.temperature < 0, "--temperature must be >= 0 (0 = greedy)"),
                         (args.top_k is not None and args.top_k < 1, "--top-k must be >= 1"),
                         (args.top_p is not None and not 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                         (args.num_samples < 1, "--num-samples must be >= 1"),
                         ("" in args.stop, "--stop needs a text to stop at (it was empty)")):
        if bad:
            raise UserError(message)
    _check_device(args.device)
    model, tokenizer, extra, _ = load_model(args.model, "lm", args.device)
    _with_adapter(args, model, extra, "lm")
    tokenizer.encode(args.prompt)  # characters outside the vocabulary: an error before any output
    _choose_precision(args)
    model = inference_model(model, args.precision)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("-" * 15)
        sys.stdout.write(args.prompt)
        text = args.prompt
        for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
            text = text[-1:] + piece
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------- translate
def _read_inputs(args) -> list[str]:
    if args.sentences:
        lines = list(args.sentences)
    elif args.input and args.input != "-":
        from aiayn.data.corpus import read_lines

        lines = read_lines(args.input)
    else:
        if sys.stdin.isatty():
            raise UserError("give sentences as arguments, --input FILE, or text on standard input")
        data = sys.stdin.buffer.read()
        try:
            lines = data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise UserError(f"standard input, line {line}: invalid UTF-8") from None
    if not any(line.strip() for line in lines):
        raise UserError("nothing to translate: the input is empty")
    return lines


def _load_translation(args) -> tuple:
    """--model (repeatable: an ensemble) and --adapter -> (model, tokenizer, extra, model directories)."""
    from aiayn.checkpoint import load_translation_models

    if getattr(args, "adapter", None) and len(args.model or []) > 1:
        raise UserError("--adapter fine-tunes one model: give one --model")
    model, tokenizer, extra, dirs = load_translation_models(args.model, args.device)
    return model, tokenizer, _with_adapter(args, model, extra, "translation"), dirs


def _with_adapter(args, model, extra: dict, task: str) -> dict:
    """--adapter PATH: the LoRA adapter merged into the loaded model (aiayn.finetune) -> its metadata."""
    if not getattr(args, "adapter", None):
        return extra
    from aiayn.finetune import apply_adapter

    return apply_adapter(model, extra, args.adapter, task)


def _check_workers(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be >= 1")


def _choose_precision(args, purpose: str = "decode") -> None:
    """args.precision ("auto" unless given) -> the precision this machine runs natively; "auto" says
    its choice and why on stderr, an explicit precision the machine lacks is a one-line error."""
    from aiayn.capability import PrecisionError, choose_precision

    try:
        args.precision, why = choose_precision(args.precision, args.device, purpose)
    except PrecisionError as e:
        raise UserError(str(e)) from None
    if why:
        print(f"aiayn: {why}", file=sys.stderr)


def _seed(text: str) -> int:
    """argparse type: a random seed PyTorch takes (0 to 2^63 - 1)."""
    from aiayn.config import SEEDS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(f"a seed is from 0 to 2^63 - 1, got {text}")
    return value


def _finite(text: str) -> float:
    """argparse type: a finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


MAX_BEAM = 64       # a CLI beam: memory grows with beam x sentences x vocabulary (the server's limit: 8)
MAX_EXPLAIN_TOP_K = 50


def _check_listen(host: str, port: int) -> None:
    """One line now, rather than uvicorn's log after the models load, where the address is taken or
    the host unknown."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting")[0]  # (create_server names the address again)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the second existing)."""
    try:
        return Path(a).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_beam(beam: int) -> None:
    if not 1 <= beam <= MAX_BEAM:
        raise UserError(f"--beam must be from 1 to {MAX_BEAM}, got {beam}")


def _alpha(args, extra: dict) -> float:
    """--alpha if given, else the length penalty recorded in the model (aiayn average --alpha), else 0.6."""
    from aiayn.decode.beam import MAX_ALPHA

    if args.alpha is not None:
        if not 0 <= args.alpha <= MAX_ALPHA:
            raise UserError(f"--alpha must be from 0 to {MAX_ALPHA:g}, got {args.alpha:g}")
        return args.alpha
    return float(extra.get("alpha", 0.6))


def cmd_translate(args) -> int:
    from aiayn.translate import translate, translate_text

    _check_beam(args.beam)
    if not 1 <= args.n_best <= args.beam:
        raise UserError(f"--n-best must be from 1 to --beam ({args.beam}), got {args.n_best}")
    _check_device(args.device)
    _check_workers(args)
    lines = _read_inputs(args)
    model, tokenizer, extra, _ = _load_translation(args)
    _choose_precision(args)
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    options = dict(beam=args.beam, alpha=_alpha(args, extra), device=args.device, precision=args.precision,
                   workers=args.workers)
    if args.n_best > 1:  # n-best lists are of whole lines
        outputs = translate(model, tokenizer, lines, n_best=args.n_best, **options)
    else:  # one line in, one line out; a line of several sentences is translated sentence by sentence
        outputs = translate_text(model, tokenizer, lines, lang=extra.get("src", "en"), **options)
    for i, out in enumerate(outputs):
        if args.n_best > 1:
            for text, score in out:
                print(f"{i}\t{score:.4f}\t{'' if i in empty else text}")
        else:
            print("" if i in empty else out)
    return 0


# ----------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    import time

    from aiayn.data.corpus import multi30k, multi30k_tok_reference, read_parallel
    from aiayn.evaluate import bleu, bleu_signature, chrf, lc_tok_bleu
    from aiayn.translate import translate

    _check_beam(args.beam)
    _check_device(args.device)
    _check_workers(args)
    if bool(args.src_file) != bool(args.ref_file):
        raise UserError("--src-file and --ref-file go together")
    if args.hyp_out and any(_same_file(args.hyp_out, f) for f in (args.src_file, args.ref_file) if f):
        raise UserError(f"--hyp-out {args.hyp_out} would overwrite an input file: write the translations elsewhere")
    model, tokenizer, extra, model_dirs = _load_translation(args)
    _choose_precision(args)
    src_lang, tgt_lang = extra.get("src", "en"), extra.get("tgt", "de")
    if args.src_file:
        pairs = read_parallel(args.src_file, args.ref_file)
        tok_ref = None
    else:
        pairs = multi30k(args.split, src_lang, tgt_lang)
        tok_ref = multi30k_tok_reference(args.split, tgt_lang) if args.split != "train" else None
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    t0 = time.perf_counter()
    alpha = _alpha(args, extra)
    hyps = translate(model, tokenizer, sources, beam=args.beam, alpha=alpha, device=args.device,
                     precision=args.precision, workers=args.workers)
    seconds = time.perf_counter() - t0
    score = bleu(hyps, refs)
    result = {"model": ",".join(str(d) for d in model_dirs),
              "split": args.split if not args.src_file else args.src_file,
              "beam": args.beam, "alpha": alpha, "precision": args.precision, "sacrebleu": round(score.score, 2),
              "chrf": round(chrf(hyps, refs), 2), "signature": bleu_signature(hyps, refs),
              "seconds": round(seconds, 1)}
    if tok_ref is not None:
        result["lc_tok_bleu"] = round(lc_tok_bleu(hyps, tok_ref, tgt_lang), 2)
    if args.hyp_out:
        Path(args.hyp_out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ average
def cmd_average(args) -> int:
    from aiayn.average import average_checkpoints

    run, out = Path(args.run_dir), Path(args.out)
    n = len(average_checkpoints(run, args.last, out, alpha=args.alpha))
    fewer = f" (all it has: --last asked for {args.last})" if n < args.last else ""
    print(f"averaged the last {n} checkpoint{'s' if n != 1 else ''} of {run} into {out}{fewer}")
    return 0


# ------------------------------------------------------------------------------------- vision
def _vision_run(args, task_name: str):
    """-> (model config, TrainConfig, data path) of a new run, or of the run in --out with --resume."""
    from aiayn.train.distributed import launched

    if launched() and int(os.environ["WORLD_SIZE"]) > 1:  # N copies would write one run directory
        raise UserError(f"train {args.task} runs in one process; torchrun trains translation and lm")
    previous = _resume_settings(args, task_name)
    if not previous:
        return None
    cfg, tcfg = _resumed_run(args, previous)
    return cfg, tcfg, args.data or previous.get("data"), previous


def _image_data(path):
    from aiayn.data.images import load_images

    data = load_images(path)
    print(f"data: {path or 'the shipped mnist10k'}: {len(data):,} images of {data.images.shape[2]}x"
          f"{data.images.shape[1]} pixels, {len(data.classes)} classes", file=sys.stderr)
    return data


def _default_stops(args, recipe) -> dict:
    """A recipe's settings with its stopping rules, unless the command line gives any: then only
    those apply (--max-cpu-minutes alone sizes a cosine to the time budget)."""
    from aiayn.train.runs import STOPS

    given = any(getattr(args, k, None) is not None for k in STOPS)
    return {**recipe.to_dict(), **({k: None for k in STOPS} if given else {})}


def cmd_train_vit(args) -> int:
    import torch

    from aiayn.config import ViTConfig
    from aiayn.data.images import Labels
    from aiayn.model.vit import VisionTransformer
    from aiayn.tasks.vision import ViTTask, split_train_val, vit_train
    from aiayn.train.loop import Trainer

    _check_device(args.device)
    _finetune_request(args)
    resumed = _vision_run(args, "vit")
    init, previous = None, None
    if resumed:
        cfg, tcfg, data_path, previous = resumed
    else:
        data_path = args.data
        _choose_precision(args, "train")
        # default: a cosine over 15 minutes of the process's CPU time, ending where the budget does
        tcfg = _train_config(args, **_default_stops(args, vit_train(max_cpu_minutes=15)))
    data = _image_data(data_path)
    if not resumed:
        shape = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers), ("n_heads", args.n_heads),
                                   ("d_ff", args.d_ff), ("patch_size", args.patch_size), ("pool", args.pool),
                                   ("positional", args.positional), ("dropout", args.dropout)) if v is not None}
        if data.images.shape[1] != data.images.shape[2]:
            raise UserError(f"images of {data.images.shape[2]}x{data.images.shape[1]} pixels: the ViT takes square images")
        if args.init_from:  # fine-tuning: the trained ViT's shape and weights; its head if the classes are its
            init, cfg = _vit_base(args, data, shape)
        else:
            cfg = ViTConfig(image_size=int(data.images.shape[1]), n_classes=len(data.classes), **shape)
    train, val = split_train_val(data)
    torch.manual_seed(tcfg.seed)
    model = VisionTransformer(cfg)
    if init is not None:
        same_head = init.head.weight.shape == model.head.weight.shape and init.labels == list(data.classes)
        state = {k: v for k, v in init.state_dict().items() if same_head or not k.startswith("head.")}
        model.load_state_dict(state, strict=same_head)
    extra = _finetune_model(args, model, "vit", previous, {})
    task = ViTTask(train, val, cfg, tcfg.batch_size, tcfg.device, augmentation=not args.no_augment)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {len(train):,} training and {len(val):,} validation images; "
          f"run directory {args.out}", file=sys.stderr)
    trainer = Trainer(task, model, Labels(data.classes), tcfg, Path(args.out),
                      extra_meta={"data": str(data_path) if data_path else None, **extra})
    print(json.dumps(trainer.run(resume=args.resume, progress=not args.quiet), default=str))
    return 0


def _keep_shape(shape: dict, flags: dict | None = None) -> None:
    """--init-from keeps the trained model's shape: any shape option given but dropout is refused
    (`flags`: an option's name where it is not the field's)."""
    given = [k for k in shape if k != "dropout"]
    if given:
        raise UserError("--init-from keeps the model's shape: drop --" + ", --".join(
            (flags or {}).get(k, k.replace("_", "-")) for k in given))


def _vit_base(args, data, shape: dict):
    """--init-from for a ViT -> (the trained model, with its class names as .labels; the run's config:
    its shape, the data's classes)."""
    from aiayn.finetune import load_base

    _keep_shape(shape)
    init, labels, _ = load_base(args.init_from, "vit")
    if init.cfg.image_size != data.images.shape[1]:
        raise UserError(f"{args.init_from} reads {init.cfg.image_size}x{init.cfg.image_size} images, the data "
                        f"has {data.images.shape[2]}x{data.images.shape[1]}")
    init.labels = list(labels.classes)
    print(f"starting from {args.init_from} (its shape; "
          f"{'its head' if init.labels == list(data.classes) else 'a new head for the data classes'})",
          file=sys.stderr)
    return init, init.cfg.replace(n_classes=len(data.classes), **shape)


def cmd_train_pixels(args) -> int:
    import torch

    from aiayn.checkpoint import model_dir
    from aiayn.data.pixels import PixelTokenizer
    from aiayn.model import build_model
    from aiayn.tasks.pixels import PixelLMTask, pixel_config, pixel_train
    from aiayn.tasks.vision import split_train_val
    from aiayn.train.loop import Trainer

    _check_device(args.device)
    _finetune_request(args)
    if args.shift < 0:
        raise UserError(f"--shift is a number of pixels, 0 or more, not {args.shift}")
    resumed = _vision_run(args, "image-gpt")
    init, previous = None, resumed[3] if resumed else None
    data_path = resumed[2] if resumed else args.data
    data = _image_data(data_path)
    if data.images.shape[1] != data.images.shape[2]:
        raise UserError(f"images of {data.images.shape[2]}x{data.images.shape[1]} pixels: use square images")
    if not resumed and args.shift and args.shift >= data.images.shape[1] // 2:
        raise UserError(f"--shift {args.shift} would move {data.images.shape[1]}-pixel images out of sight: "
                        f"use less than {data.images.shape[1] // 2}")
    if resumed:
        mcfg, tcfg, _, _ = resumed
        tokenizer = PixelTokenizer.load(model_dir(args.out))
    else:
        _choose_precision(args, "train")
        floor = {"min_lr": args.lr / 10} if args.lr is not None and args.lr > 0 else {}  # a tenth of the peak given
        tcfg = _train_config(args, **_default_stops(args, pixel_train(max_steps=1500, max_minutes=60, **floor)))
        shape = {k: v for k, v in (("n_decoder_layers", args.n_layers), ("n_heads", args.n_heads),
                                   ("d_model", args.d_model), ("d_ff", args.d_ff), ("dropout", args.dropout)) if v is not None}
        if args.init_from:  # fine-tuning: the trained model's shape, palette and classes
            from aiayn.finetune import load_base

            _keep_shape(shape, {"n_decoder_layers": "n-layers"})
            init, tokenizer, _ = load_base(args.init_from, "image-gpt")
            if (tokenizer.classes, tokenizer.image_size) != (list(data.classes), int(data.images.shape[1])):
                raise UserError(f"{args.init_from} draws {tokenizer.image_size}-pixel images of classes "
                                f"{','.join(tokenizer.classes)}: the data must have the same")
            mcfg = init.cfg.replace(**{k: v for k, v in shape.items() if k == "dropout"})
            print(f"starting from {args.init_from} (its shape, {tokenizer.levels} gray levels)", file=sys.stderr)
        else:
            tokenizer = PixelTokenizer(args.levels, data.classes, int(data.images.shape[1]))
            mcfg = pixel_config(tokenizer, **shape)
    train, val = split_train_val(data)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    extra = _finetune_model(args, model, "image-gpt", previous, {})
    shift = previous.get("shift", 0) if previous else args.shift
    task = PixelLMTask(train, val, tokenizer, tcfg.batch_size, tcfg.device, shift=shift)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {tokenizer.levels} gray levels; {len(train):,} training "
          f"and {len(val):,} validation images; run directory {args.out}", file=sys.stderr)
    trainer = Trainer(task, model, tokenizer, tcfg, Path(args.out),
                      extra_meta={"data": str(data_path) if data_path else None, "shift": shift, **extra})
    print(json.dumps(trainer.run(resume=args.resume, progress=not args.quiet), default=str))
    return 0


def _vision_model(arg: str | None, task: str, device: str = "cpu"):
    from aiayn.checkpoint import load_model

    model, tokenizer, _, model_dir = load_model(arg, task, device)
    return model, tokenizer, model_dir


def cmd_classify(args) -> int:
    from aiayn.vision import classify_files

    if args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    model, labels, _ = _vision_model(args.model, "vit")
    failed = 0
    for r in classify_files(model, labels, args.images, args.top_k):
        if r.error:
            failed += 1
            print(f"aiayn: error: {r.error}", file=sys.stderr)
        else:
            print("\t".join([r.path, *(f"{label}\t{p:.4f}" for label, p in r.top)]), flush=True)
    return EXIT_ERROR if failed else 0


def cmd_generate_image(args) -> int:
    from aiayn.data.images import read_image
    from aiayn.tasks.pixels import generate_images, image_grid, save_png

    for bad, message in ((args.n < 1, "--n must be >= 1"), (args.n > 1024, "--n must be <= 1024"),
                         (args.temperature <= 0, "--temperature must be > 0"),
                         (args.top_k is not None and args.top_k < 1, "--top-k must be >= 1"),
                         (args.top_p is not None and not 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                         (args.scale < 1 or args.scale > 16, "--scale must be in 1..16"),
                         (not args.guidance >= 0, "--guidance must be >= 0 (1 = the model's own samples)"),
                         (args.guidance != 1.0 and args.label is None, "--guidance needs --label (it draws "
                          "images more like that label)"),
                         (args.keep_rows is not None and args.prompt_image is None, "--keep-rows needs --prompt-image")):
        if bad:
            raise UserError(message)
    if not str(args.out).lower().endswith(".png"):
        raise UserError(f"{args.out}: the grid is written as PNG; give a file name ending in .png")
    model, tokenizer, model_dir = _vision_model(args.model, "image-gpt")
    label = None
    if args.label is not None:
        if args.label not in tokenizer.classes:
            raise UserError(f"unknown label {args.label!r}: this model knows {', '.join(tokenizer.classes)}")
        label = tokenizer.classes.index(args.label)
    prompt, keep = None, 0
    if args.prompt_image:
        size = tokenizer.image_size
        keep = size // 2 if args.keep_rows is None else args.keep_rows
        if not 0 <= keep <= size:
            raise UserError(f"--keep-rows must be in 0..{size}")
        prompt = read_image(args.prompt_image, (size, size))
    images = generate_images(model, tokenizer, [label] * args.n, args.temperature, args.top_k, args.top_p,
                             args.seed, prompt=prompt, keep_rows=keep, guidance=args.guidance)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(images, scale=args.scale), args.out)
    what = f"label {args.label}" if label is not None else "any label"
    print(f"wrote {args.n} images ({what}{f', {keep} rows of {args.prompt_image} kept' if prompt is not None else ''}) "
          f"to {args.out}")
    return 0


def _explain_image(args, image_arg: str) -> int:
    from aiayn.data.images import read_image
    from aiayn.vision import explain_image

    model, labels, model_dir = _vision_model(args.model, "vit", args.device)
    image = read_image(image_arg, (model.cfg.image_size,) * 2)
    text, paths = explain_image(model, labels, image, Path(args.out))
    print(f"model: {model_dir} (vit)")
    print(text)
    print(f"wrote {len(paths)} images to {args.out}: {', '.join(p.name for p in paths)}")
    return 0


# ------------------------------------------------------------------------------------ explain
def _is_image_request(args) -> bool:
    """explain IMAGE: one argument that is an image file, or a --model that is a ViT."""
    from aiayn.checkpoint import model_dir, read_model_meta
    from aiayn.data.images import IMAGE_SUFFIXES

    if args.model:
        try:
            return read_model_meta(model_dir(args.model))[1] == "vit"
        except InputError:
            return False  # the text path reports the problem
    return len(args.sentence) == 1 and Path(args.sentence[0]).suffix.lower() in IMAGE_SUFFIXES


def cmd_explain(args) -> int:
    from aiayn.checkpoint import load_model_dir, model_dir
    from aiayn.explain import explain_lm, explain_translation, save_figures, summary
    from aiayn.fast.inference import inference_model

    _check_device(args.device)
    text = " ".join(args.sentence)
    if _is_image_request(args):
        if len(args.sentence) != 1:
            raise UserError("explain takes one image file for a ViT model")
        return _explain_image(args, args.sentence[0])
    if not text.strip():
        raise UserError("nothing to explain: give a sentence (or, for a language model, a prompt)")
    if not 1 <= args.top_k <= MAX_EXPLAIN_TOP_K:
        raise UserError(f"--top-k must be from 1 to {MAX_EXPLAIN_TOP_K}, got {args.top_k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    directory = model_dir(args.model, "translation")
    model, tokenizer, task, extra = load_model_dir(directory, args.device)
    if task not in ("translation", "lm"):
        raise UserError(f"{directory} holds a {task} model; explain knows translation and lm models")
    _with_adapter(args, model, extra, task)
    tokenizer.encode(text)  # characters outside the vocabulary: an error before anything else is said
    _choose_precision(args)
    model = inference_model(model, args.precision)
    if task == "translation":
        ex = explain_translation(model, tokenizer, text, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    else:
        ex = explain_lm(model, tokenizer, text, top_k=args.top_k, max_new_tokens=args.max_new_tokens or 10)
    paths = save_figures(ex, Path(args.out))
    print(f"model: {directory} ({task})")
    print(summary(ex))
    print(f"wrote {len(paths)} images to {args.out}: {', '.join(p.name for p in paths)}")
    return 0


# -------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from aiayn.bench import run_suite

    _check_device(args.device)
    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    extra = [*(["--configs", args.configs] if args.configs else []),
             *(["--rounds", str(args.rounds)] if args.rounds else []),
             *(["--device", args.device] if args.device != "cpu" else [])]
    try:
        return run_suite(args.part, quick=args.quick, extra=extra)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------------ machine
def cmd_machine(args) -> int:
    import torch

    from aiayn import capability, kernels
    from aiayn.kernels import tuning

    _check_device(args.device)
    print(capability.probe(args.device).describe())
    print(f"auto: {capability.choose_precision('auto', args.device)[1]}")
    print(f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ""))
    if torch.device(args.device).type == "cuda":
        print("C kernels: for a CPU only (on a GPU PyTorch's operators run)")
        return 0
    threads = torch.get_num_threads()
    print(f"threads: {threads} (PyTorch's; OMP_NUM_THREADS sets them)")
    if not kernels.enabled():
        print("C kernels: off (AIAYN_KERNELS=0): PyTorch's operators run")
        return 0
    library = kernels.library_path()
    tables = [tuning.torch_table()] + ([library] if library else [])
    if args.retime:
        removed = [t for table in tables for t in tuning.clear(table)]
        print(f"removed {len(removed)} table(s) of timings: each choice is timed again at its next use")
        return 0
    if library is None:
        print("C kernels: none here (no C compiler, a failed build, or neither Linux nor macOS): PyTorch's "
              "operators run")
    else:
        every = " (AIAYN_KERNELS=all: every kernel wherever it takes the inputs, whatever the timings)"
        print(f"C kernels: {library}{every if os.environ.get('AIAYN_KERNELS') == 'all' else ''}")
    decisions = {}
    for table in tables:
        decisions |= tuning.saved(table)
    if not decisions:
        print(f"timings: none yet for {threads} thread(s): each choice is timed at its first use")
        return 0
    print(f"timed on this CPU with {threads} thread(s) (speed-up: PyTorch's time / aiayn's choice's; "
          f"tables in {tables[0].parent}):")
    rows = [(key, *tuning.in_words(key, decision, speedups),
             f"timed while other work ran ({busy:.1f} cores): timed again on a quiet CPU"
             if isinstance(busy, (int, float)) and busy > tuning.BUSY else "")
            for key, (decision, speedups, busy) in sorted(decisions.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + (f"  {row[4]}" if row[4] else ""))
    print("a choice not listed is timed at its first use; `aiayn machine --retime` times every one again")
    return 0


# ----------------------------------------------------------------------------- import / export
def cmd_import(args) -> int:
    from aiayn.checkpoint import write_model
    from aiayn.interop import import_gpt2, import_marian
    from aiayn.interop.hf import write_directory

    model, tokenizer, extra = (import_marian if args.kind == "marian" else import_gpt2)(Path(args.dir))
    task = "translation" if args.kind == "marian" else "lm"
    write_directory(Path(args.out), lambda d: write_model(d, model, tokenizer, task, extra))
    c = model.cfg
    print(f"imported {args.dir} ({args.kind}: d_model {c.d_model}, {c.n_encoder_layers}+{c.n_decoder_layers} "
          f"layers, {c.n_heads} heads, vocabulary {c.target_vocab}) into {args.out}")
    return 0


def cmd_export(args) -> int:
    from aiayn.checkpoint import load_model_dir, model_dir
    from aiayn.interop import export_ct2, export_hf
    from aiayn.interop.hf import write_directory

    if args.quantization and args.format != "ct2":
        raise UserError("--quantization is for `export ct2` (an HF export keeps float32 weights)")
    directory = model_dir(args.model)
    model, tokenizer, task, extra = load_model_dir(directory)
    if args.format == "ct2":
        def write(d):
            return export_ct2(model, tokenizer, task, d, args.quantization)
    else:
        def write(d):
            return export_hf(model, tokenizer, task, d, extra)
    written = []
    write_directory(Path(args.out), lambda d: written.append(write(d)))
    what = f"a CTranslate2 {written[0]} ({args.quantization or 'float32'})" if args.format == "ct2" else written[0]
    print(f"exported {directory} ({task}) as {what} into {args.out}")
    return 0


# -------------------------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    import ipaddress

    from aiayn.fast.inference import bound_primitive_caches

    bound_primitive_caches()  # requests of every shape: memory stays flat
    try:
        import uvicorn

        from aiayn.checkpoint import CheckpointError, model_dir
        from aiayn.serve.app import create_app
        from aiayn.serve.models import Limits, load_models
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install 'aiayn[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be in 0..65535")
    for name in ("beam", "max_queue", "timeout", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.batch_wait_ms < 0:
        raise UserError("--batch-wait-ms must be >= 0")
    _check_device(args.device)
    translation_dir = None if args.no_translation else model_dir(args.model, "translation")
    lm_dir = None
    if args.lm:
        lm_dir = model_dir(args.lm, "lm")
    elif not args.no_lm:
        try:  # the shipped language model, where this install has one
            lm_dir = model_dir(None, "lm")
        except CheckpointError:
            pass
    if translation_dir is None and lm_dir is None:
        raise UserError("nothing to serve: give a translation model (--model) or a language model (--lm)")
    _check_listen(args.host, args.port)
    _choose_precision(args)
    models = load_models(translation_dir, lm_dir, args.device, adapters=args.adapter or [])
    api_key = args.api_key or os.environ.get("AIAYN_API_KEY") or None
    limits = Limits(max_queue=args.max_queue, timeout_s=args.timeout, batch_wait_ms=args.batch_wait_ms,
                    max_new_tokens=args.max_new_tokens)
    app = create_app(models, limits, api_key=api_key, beam=args.beam, precision=args.precision)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"aiayn: warning: serving on {args.host}, reachable from other machines"
              f"{'' if api_key else ' without an API key (--api-key)'}", file=sys.stderr)
    served = ", ".join(f"{kind} {d}" for kind, d in (("translation", translation_dir), ("lm", lm_dir)) if d)
    print(f"aiayn: serving {served} on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


# -------------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    from aiayn.checkpoint import model_dir
    from aiayn.finetune import merge_to_directory

    out = merge_to_directory(model_dir(args.model), args.adapter, args.out)
    print(f"wrote {out}: {args.model} with {args.adapter} merged into its weights (the model itself is unchanged)")
    return 0


# ------------------------------------------------------------------------------------- parser
def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, curves.png)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--device", default="cpu", help=DEVICE_HELP)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16-model", "fp16"],
                   help="auto (default): bf16 autocast where the device computes bf16 natively (CUDA; "
                        "CPUs with AVX512_BF16, AMX or ARM BF16 measured faster), else fp32; bf16: autocast; "
                        "bf16-model: the model itself in bf16, fp32 master weights in the optimizer (a few percent faster "
                        "for text models on a CPU with bf16); fp16: CUDA, with a loss scaler. On --resume: the run's own")
    g.add_argument("--max-steps", type=int, help="stop after this many updates")
    g.add_argument("--max-epochs", type=int, help="stop after this many passes over the data")
    g.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    g.add_argument("--max-cpu-minutes", type=float, help="stop after this much CPU time of the training loop "
                   "(validation and saving included): equal compute for runs on a shared machine")
    g.add_argument("--lr", type=float, help="peak learning rate (end of warm-up)")
    g.add_argument("--warmup", type=int, help="warm-up updates (§5.3)")
    g.add_argument("--update-freq", type=int, help="accumulate gradients over N batches per update")
    g.add_argument("--clip-norm", type=float, help="clip the gradient norm to this value")
    g.add_argument("--eval-every", type=int, help="validate and save every N updates")
    g.add_argument("--keep-last", type=int, help="checkpoints to keep besides the best (default 5)")
    g.add_argument("--log-every", type=int, help="log metrics every N updates")
    g.add_argument("--seed", type=_seed, help="random seed (default 1)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel (default) or FSDP (weights, gradients and "
                        "optimizer state sharded across ranks); see docs/DISTRIBUTED.md")


def _add_prepare_parsers(sub) -> None:
    prep = sub.add_parser("prepare", help="tokenize a corpus once into memory-mapped shards (for corpora "
                          "larger than memory)")
    psub = prep.add_subparsers(dest="task", metavar="TASK")
    p = psub.add_parser("translation", help="a parallel corpus (default: Multi30k)",
                        description="Learn (or reuse) a joint BPE vocabulary and write the training pairs as "
                        "NumPy .npy shards of token ids (format: aiayn/data/prepared.py), which `aiayn train "
                        "translation --prepared DIR` streams with length bucketing.")
    p.add_argument("--train-src", help="training source file (plain or .gz, one sentence a line)")
    p.add_argument("--train-tgt", help="training target file, aligned with --train-src")
    p.add_argument("--val-src", help="validation source file")
    p.add_argument("--val-tgt", help="validation target file")
    p.add_argument("--src", default="en", help="Multi30k source language (without files)")
    p.add_argument("--tgt", default="de", help="Multi30k target language (without files)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size (default 8000)")
    p.add_argument("--tokenizer", metavar="DIR", help="reuse the tokenizer of a model, run checkpoint or "
                   "prepared directory instead of learning one")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.set_defaults(func=cmd_prepare_translation)
    q = psub.add_parser("lm", help="a text file (default: Tiny Shakespeare)",
                        description="Tokenize a text into train.npy and val.npy (the first 90% of its tokens "
                        "train), which `aiayn train lm --prepared DIR` memory-maps.")
    q.add_argument("--data", help="a UTF-8 text file, plain or .gz")
    q.add_argument("--tokenizer", choices=("char", "bpe"), help="char (default) or bpe")
    q.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size (default 2000)")
    q.add_argument("--tokenizer-from", metavar="DIR", help="reuse the tokenizer of a model or prepared directory")
    q.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    q.set_defaults(func=cmd_prepare_lm)


def _add_finetune_options(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("fine-tuning (docs/FINETUNING.md)")
    recipe = {"translation": "", "lm": "; recipe: 500 steps, lr 3e-4 (LoRA 1e-3) cosine to a tenth, context = "
              "the model's", "vit": "; a new head where the data's classes differ from the model's"}.get(task, "")
    g.add_argument("--init-from", metavar="MODEL", help=f"fine-tune: start from a trained {task} model or run "
                   "directory (its shape and tokenizer), with a fresh optimizer and schedule" + recipe)
    parts = {"translation": "embeddings (with the tied output projection), encoder, decoder",
             "lm": "embeddings (with a tied output projection), decoder",
             "vit": "embeddings (patches, class token, positions), encoder (both: a linear probe)",
             "image-gpt": "embeddings, decoder"}[task]
    g.add_argument("--freeze", metavar="PARTS", help=f"with --init-from: parts that do not train, comma-separated: "
                   f"{parts}")
    if task in ("vit", "image-gpt"):
        return
    g.add_argument("--lora-rank", type=int, metavar="R", help="with --init-from: train LoRA adapters of rank R "
                   "only (Hu et al. 2021); the run also writes RUN_DIR/adapter.safetensors")
    g.add_argument("--lora-alpha", type=float, help="LoRA scaling alpha (the update is alpha/R * B A; default R)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help="layers to adapt: q,k,v (rows of every attention's in_proj), o (out_proj), ff "
                   "(feed-forward) (default q,k,v,o)")


class _DefaultsHelp(argparse.HelpFormatter):
    """An option's default after its help, where it has one and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _add_vision_train_parsers(tsub) -> None:
    v = tsub.add_parser("vit", help="Vision Transformer image classifier (default: the shipped mnist10k digits)",
                        description="Train a ViT (Dosovitskiy et al. 2021) on the project's own pre-norm encoder "
                        "layers: patch embedding, class token, 2-D sinusoidal positions, linear head; random "
                        "shifts, rotations, zoom and shear of the training images. 1/16 of the images are held "
                        "out to choose the checkpoint. Default recipe: 4 layers, d_model 128, 4 "
                        "heads, patch 4, AdamW lr 2e-3, batches of 128 images, a cosine over "
                        "--max-cpu-minutes 15 of the process's CPU time that reaches its floor when the budget "
                        "ends (~3,700 steps on one Zen 4 core in bf16); --max-steps N sizes the cosine in "
                        "steps instead (a reproducible run). The shipped mnist-vit: this default, --seed 3.")
    v.add_argument("--data", help="an IDX directory (train-images-idx3-ubyte[.gz] + labels), an IDX images "
                   "file, or a folder with one subfolder of images per class (default: mnist10k)")
    v.add_argument("--batch-size", type=int, help="images per batch (default 128)")
    v.add_argument("--d-model", type=int, help="width (default 128)")
    v.add_argument("--n-layers", type=int, help="encoder layers (default 4)")
    v.add_argument("--n-heads", type=int, help="attention heads (default 4)")
    v.add_argument("--d-ff", type=int, help="feed-forward width (default 256)")
    v.add_argument("--patch-size", type=int, help="patch side in pixels (default 4; divides the image side)")
    v.add_argument("--pool", choices=("cls", "mean"), help="class token (default) or mean of the patches")
    v.add_argument("--positional", choices=("sincos2d", "learned"), help="positions (default sincos2d)")
    v.add_argument("--dropout", type=float, help="residual and embedding dropout (default 0)")
    v.add_argument("--label-smoothing", type=float, help="default 0.1")
    v.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    v.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    _add_finetune_options(v, "vit")
    _add_train_options(v)
    v.set_defaults(func=cmd_train_vit)
    g = tsub.add_parser("image-gpt", help="pixel-by-pixel image generator (default: mnist10k digits)",
                        description="Train a decoder-only model on images written as pixel tokens (Image GPT): "
                        "intensities quantized to --levels gray levels, raster order, a class token first "
                        "(for 10% of the images the 'any class' token, so that completion works without a "
                        "label). Validation: bits per pixel on 128 of the 1/16 of images held out. Default recipe: "
                        "1500 steps of 8 images (at most 60 minutes), AdamW lr 2e-3, cosine; any --max-* option "
                        "replaces both stops (--max-cpu-minutes alone: a cosine that ends with the budget).")
    g.add_argument("--data", help="as for train vit (default: mnist10k)")
    g.add_argument("--levels", type=int, default=8, help="gray levels of the palette (default 8)")
    g.add_argument("--batch-size", type=int, help="images per batch (default 8)")
    g.add_argument("--d-model", type=int, help="width (default 64)")
    g.add_argument("--n-layers", type=int, help="decoder layers (default 4)")
    g.add_argument("--n-heads", type=int, help="attention heads (default 2)")
    g.add_argument("--d-ff", type=int, help="feed-forward width (default 256)")
    g.add_argument("--dropout", type=float, help="residual and embedding dropout (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    g.add_argument("--shift", type=int, default=0,
                   help="augmentation: move each training image by up to this many whole pixels in "
                        "each direction (default 0: none)")
    _add_finetune_options(g, "image-gpt")
    _add_train_options(g)
    g.set_defaults(func=cmd_train_pixels)


def _add_vision_parsers(sub) -> None:
    c = sub.add_parser("classify", help="classify image files with a ViT (default: the shipped MNIST model)",
                       description="One line per image: FILE<TAB>LABEL<TAB>PROBABILITY (with --top-k, that many "
                       "label/probability pairs). Images are read as 8-bit gray and must have the model's size "
                       "(28x28 for MNIST: a white digit on black). A file that cannot be read gets a one-line "
                       "error on stderr; the others are still classified (exit status 1 if any failed).")
    c.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    c.add_argument("--model", "-m", help="ViT model or run directory (default: the shipped mnist-vit)")
    c.add_argument("--top-k", type=int, default=1, help="labels per image, most likely first (default 1)")
    c.set_defaults(func=cmd_classify)
    g = sub.add_parser("generate-image", help="draw images pixel by pixel (default: the shipped MNIST model)",
                       description="Sample images from a pixel-token model and write them as one grid PNG.")
    g.add_argument("--label", help="the class to draw (MNIST: 0-9); default: any class")
    g.add_argument("--n", type=int, default=16, help="images to draw (default 16)")
    g.add_argument("--temperature", type=_finite, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely gray levels only")
    g.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of levels with mass >= p")
    g.add_argument("--seed", type=_seed, help="random seed: the same seed draws the same images")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance with --label: > 1 draws images more like the label, less "
                   "varied, at twice the cost (e.g. 2); default 1: the model's own distribution")
    g.add_argument("--prompt-image", help="complete this image: keep its first --keep-rows rows")
    g.add_argument("--keep-rows", type=int, help="rows of --prompt-image kept (default: half)")
    g.add_argument("--scale", type=int, default=4, help="enlarge each image N times in the grid (default 4)")
    g.add_argument("--out", "-o", default="grid.png", help="the grid PNG (default grid.png)")
    g.add_argument("--model", "-m", help="image-gpt model or run directory (default: the shipped mnist-pixels)")
    g.set_defaults(func=cmd_generate_image)


def build_parser() -> argparse.ArgumentParser:
    from aiayn.config import PRESETS as MODEL_PRESETS

    parser = argparse.ArgumentParser(
        prog="aiayn", description="The Transformer of 'Attention Is All You Need': train, translate, "
        "generate, evaluate, explain.",
        epilog="Try: aiayn translate \"A man is riding a bicycle down the street.\"")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(show_help=parser.print_help)  # what `aiayn` alone prints

    train = sub.add_parser("train", help="train a model (translation, language model, ViT, image GPT)")
    train.set_defaults(show_help=train.print_help)  # what `aiayn train` alone prints
    tsub = train.add_subparsers(dest="task", metavar="TASK")
    tr = tsub.add_parser("translation", help="encoder-decoder translation (default: Multi30k en->de)",
                         formatter_class=_DefaultsHelp)
    tr.add_argument("--src", default="en", help="source language (Multi30k: en, de, fr)")
    tr.add_argument("--tgt", default="de", help="target language (Multi30k: en, de, fr)")
    tr.add_argument("--train-src", help="your own training source file (plain or .gz, one sentence a line)")
    tr.add_argument("--train-tgt", help="your own training target file, aligned with --train-src")
    tr.add_argument("--val-src", help="your own validation source file")
    tr.add_argument("--val-tgt", help="your own validation target file")
    tr.add_argument("--preset", default="small", choices=list(MODEL_PRESETS),
                    help="model shape: base and big (the paper's Table 3), small, multi30k, tiny")
    tr.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size")
    tr.add_argument("--max-tokens", type=int, help="padded tokens per batch (default 4096)")
    tr.add_argument("--label-smoothing", type=float, help="default 0.1 (§5.4)")
    tr.add_argument("--dropout", type=float, help="override the preset's dropout")
    tr.add_argument("--rdrop", type=float, help="R-Drop alpha (Liang et al., 2021; 5 for small data): each "
                    "batch runs twice and a KL term pulls the two dropout outputs together; ~2.4x a step")
    tr.add_argument("--norm-first", action="store_true", help="pre-norm layers instead of the paper's post-norm")
    tr.add_argument("--prepared", metavar="DIR", help="a corpus made by `aiayn prepare translation`: streamed "
                    "from memory-mapped shards (its vocabulary; not with --train-src)")
    _add_finetune_options(tr, "translation")
    _add_train_options(tr)
    _add_distributed_options(tr)
    tr.set_defaults(func=cmd_train_translation)
    lm = tsub.add_parser("lm", help="decoder-only language model (default: Tiny Shakespeare, characters)",
                         description="Train a GPT-style decoder-only model (pre-norm, GELU, learned positions, "
                         "tied embeddings) on a text: the first 90% trains, the last 10% validates (loss and "
                         "perplexity). Presets: shakespeare-cpu = nanoGPT's CPU configuration (4 layers, 128 "
                         "wide, context 64, batch 12, 2000 steps); shakespeare = its GPU configuration (6 "
                         "layers, 384 wide, context 256, batch 64, dropout 0.2, 5000 steps). Both: AdamW, lr "
                         "1e-3 cosine-decayed to 1e-4, bf16 autocast where the CPU computes bf16 natively (else fp32). "
                         "Options override the preset.")
    lm.add_argument("--data", help="a UTF-8 text file, plain or .gz (default: the shipped Tiny Shakespeare); "
                    "with --resume: where the run's text is now, if it moved")
    lm.add_argument("--preset", default="shakespeare-cpu", choices=("shakespeare-cpu", "shakespeare"),
                    help="model and recipe (default shakespeare-cpu)")
    lm.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                    help="char: one token per character (default); bpe: sentencepiece BPE")
    lm.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size (default 2000)")
    lm.add_argument("--context", type=int, help="tokens per window, and the model's maximum length")
    lm.add_argument("--batch-size", type=int, help="windows per batch")
    lm.add_argument("--n-layers", type=int, help="decoder layers")
    lm.add_argument("--n-heads", type=int, help="attention heads")
    lm.add_argument("--d-model", type=int, help="model width (d_ff follows as 4 x d_model unless given)")
    lm.add_argument("--d-ff", type=int, help="feed-forward width")
    lm.add_argument("--dropout", type=float, help="residual, embedding and attention dropout")
    lm.add_argument("--positional", choices=("learned", "sinusoidal"), help="position encoding (default learned)")
    lm.add_argument("--post-norm", action="store_true", help="the paper's post-norm layers instead of pre-norm")
    lm.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    lm.add_argument("--prepared", metavar="DIR", help="tokens made by `aiayn prepare lm`: memory-mapped (its "
                    "vocabulary; not with --data)")
    _add_finetune_options(lm, "lm")
    _add_train_options(lm)
    _add_distributed_options(lm)
    lm.set_defaults(func=cmd_train_lm)
    _add_vision_train_parsers(tsub)

    _add_prepare_parsers(sub)
    t = sub.add_parser("translate", help="translate sentences (arguments, --input FILE, or stdin)")
    t.add_argument("sentences", nargs="*", help="sentences to translate")
    t.add_argument("--input", "-i", help="a file with one sentence a line ('-' = stdin)")
    t.add_argument("--model", "-m", action="append", help="model or run directory (default: the shipped "
                   "en->de model); repeat it to decode with an ensemble of models of one tokenizer")
    t.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default 4)")
    t.add_argument("--alpha", type=float, help="length penalty alpha (default: the model's own, else 0.6, §6.1)")
    t.add_argument("--n-best", type=int, default=1, help="print the N best translations with scores")
    t.add_argument("--device", default="cpu", help=DEVICE_HELP)
    t.add_argument("--precision", choices=DECODE_PRECISIONS, default="auto", help=DECODE_PRECISION_HELP)
    t.add_argument("--workers", type=int, help="CPU: batches decoded at once, one thread each "
                   "(default: one per CPU thread; 1 = one batch at a time on all threads)")
    t.add_argument("--adapter", help="a LoRA adapter (adapter.safetensors, or a LoRA run directory) for --model, merged into its weights")
    t.set_defaults(func=cmd_translate)

    g = sub.add_parser("generate", help="generate text from a prompt with a language model",
                       description="Print the prompt and stream its continuation as it is generated. "
                       "Each step costs one token thanks to the KV cache. The model sees at most its "
                       "context (its maximum length): past that, the window slides, and the cache is "
                       "rebuilt from the last half-context every half-context tokens. An empty prompt "
                       "starts from a newline, as at the start of a line of the training text.")
    g.add_argument("--prompt", "-p", default="",
                   help="text to continue (default: empty); one that starts with '-' is written --prompt=-TEXT")
    g.add_argument("--model", "-m", help="model or run directory (default: the shipped Shakespeare model)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=500, help="tokens to generate (default 500)")
    g.add_argument("--temperature", "-t", type=_finite, default=0.8,
                   help="below 1 sharpens, above 1 flattens; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="nucleus sampling: the most likely tokens up to mass p")
    g.add_argument("--seed", type=_seed, help="same seed, same text (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--num-samples", type=int, default=1, help="samples, one after the other (default 1)")
    g.add_argument("--device", default="cpu", help=DEVICE_HELP)
    g.add_argument("--precision", choices=DECODE_PRECISIONS, default="auto", help=DECODE_PRECISION_HELP)
    g.add_argument("--adapter", help="a LoRA adapter (adapter.safetensors, or a LoRA run directory) for --model, merged into its weights")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="BLEU/chrF of a translation model on a test set")
    e.add_argument("--model", "-m", action="append", help="model or run directory (default: the shipped "
                   "en->de model); repeat it to evaluate an ensemble of models of one tokenizer")
    e.add_argument("--split", default="test_2016_flickr", help="Multi30k split (default test_2016_flickr)")
    e.add_argument("--src-file", help="your own test source file")
    e.add_argument("--ref-file", help="your own test reference file")
    e.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default 4)")
    e.add_argument("--alpha", type=float, help="length penalty alpha (default: the model's own, else 0.6)")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    e.add_argument("--precision", choices=DECODE_PRECISIONS, default="auto", help=DECODE_PRECISION_HELP)
    e.add_argument("--workers", type=int, help="CPU: batches decoded at once, one thread each "
                   "(default: one per CPU thread; 1 = one batch at a time on all threads)")
    e.add_argument("--hyp-out", help="write the translations to this file")
    e.add_argument("--adapter", help="a LoRA adapter (adapter.safetensors, or a LoRA run directory) for --model, merged into its weights")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("average", help="average the last N checkpoints of a run (§6.1)")
    a.add_argument("run_dir", help="a training run directory (aiayn train ... --out RUN_DIR)")
    a.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints (default 5)")
    a.add_argument("--out", required=True, help="directory for the averaged model")
    a.add_argument("--alpha", type=float, help="record this length penalty (chosen on validation data) as "
                   "the model's default for translate and evaluate")
    a.set_defaults(func=cmd_average)

    x = sub.add_parser("explain", help="show what the model does with a sentence (attention maps, ...)",
                       description="Attention maps (every layer and head), the positional encoding and the "
                       "next-token distributions of one input, as PNGs in --out and a text summary.")
    x.add_argument("sentence", nargs="*", help="the sentence to translate (or the prompt, for a language model; "
                   "or one image file, for a ViT)")
    x.add_argument("--model", "-m", help="model or run directory, translation, lm or vit (default: the shipped "
                   "en->de model; for an image file, the shipped MNIST ViT)")
    x.add_argument("--out", "-o", default="explain", help="directory for the PNGs (default ./explain)")
    x.add_argument("--top-k", type=int, default=5, help="next tokens shown per step (default 5)")
    x.add_argument("--max-new-tokens", type=int, help="output tokens at most (translation default: source "
                   "length + 50; language model default: 10)")
    x.add_argument("--device", default="cpu", help=DEVICE_HELP)
    x.add_argument("--precision", choices=DECODE_PRECISIONS, default="auto", help=DECODE_PRECISION_HELP)
    x.add_argument("--adapter", help="a LoRA adapter (adapter.safetensors, or a LoRA run directory) for --model, merged into its weights")
    x.set_defaults(func=cmd_explain)
    _add_vision_parsers(sub)
    s = sub.add_parser("serve", help="serve models over HTTP: an API and a web page",
                       description="An HTTP API (translate, LibreTranslate-compatible /translate, generate "
                       "with streaming, explain) and a web page at / that translates, shows the attention and "
                       "streams generated text. Concurrent requests are decoded together (dynamic batching). "
                       "See docs/SERVING.md.")
    s.add_argument("--model", "-m", help="translation model or run directory (default: the shipped en->de model)")
    s.add_argument("--lm", help="language model or run directory (default: the shipped Shakespeare model)")
    s.add_argument("--no-translation", action="store_true", help="serve no translation model")
    s.add_argument("--no-lm", action="store_true", help="serve no language model")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /healthz and "
                   "the page (default: $AIAYN_API_KEY; none = open)")
    s.add_argument("--beam", type=int, default=4, help="default beam size of translations (default 4)")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                   help="default decoding precision of requests: auto (default): bf16 where the device computes "
                   "it natively, else fp32; fp32; bf16; int8 (CPU: dynamically quantized linears)")
    s.add_argument("--max-queue", type=int, default=512, help="sentences waiting at most; more get 503 "
                   "(default 512)")
    s.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch gathers requests at "
                   "most; it stops sooner when none came for 2 ms (default 20)")
    s.add_argument("--max-new-tokens", type=int, default=1000, help="generation limit per request (default 1000)")
    s.add_argument("--timeout", type=_finite, default=60.0, help="seconds per request at most (default 60)")
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--adapter", action="append", help="a LoRA adapter, merged into the served model of its "
                   "task (translation or lm); repeatable")
    s.set_defaults(func=cmd_serve)
    mg = sub.add_parser("merge", help="fold a LoRA adapter into a model's weights",
                        description="Write MODEL with the adapter merged into its weights as a plain model "
                        "directory: it decodes at the base model's speed with every command. The adapter must "
                        "have been trained on MODEL (its weights' SHA-256 is checked).")
    mg.add_argument("model", help="the base model or run directory the adapter was trained on")
    mg.add_argument("--adapter", required=True, help="the adapter (adapter.safetensors, or a LoRA run directory)")
    mg.add_argument("--out", required=True, help="the directory to write (new or empty)")
    mg.set_defaults(func=cmd_merge)
    im = sub.add_parser("import", help="import a pretrained HF model directory (OPUS-MT Marian, GPT-2)",
                        description="Convert a local HF-format directory (config.json, model.safetensors or "
                        "pytorch_model.bin, tokenizer files) into an aiayn model directory.")
    im.add_argument("kind", choices=["marian", "gpt2"], help="marian: MarianMTModel (OPUS-MT); gpt2: GPT2LMHeadModel")
    im.add_argument("dir", help="the HF model directory")
    im.add_argument("--out", required=True, help="the aiayn model directory to write (new or empty)")
    im.set_defaults(func=cmd_import)
    ex = sub.add_parser("export", help="export an aiayn model to another format (hf, ct2)",
                        description="Write an aiayn model as an HF directory that transformers loads with "
                        "from_pretrained (a translation model as MarianMTModel, a language model as "
                        "GPT2LMHeadModel), or as a CTranslate2 model directory (ctranslate2.Translator / "
                        "Generator; pip install ctranslate2) with the model's tokenizer beside it.")
    ex.add_argument("format", choices=["hf", "ct2"], help="hf: a transformers directory; ct2: a CTranslate2 model")
    ex.add_argument("model", help="the aiayn model directory (or a run directory)")
    ex.add_argument("--out", required=True, help="the directory to write (new or empty)")
    ex.add_argument("--quantization", help="ct2: the weights' type (float32 by default; int8, int8_float32, "
                    "int8_float16, int8_bfloat16, int16, float16, bfloat16)")
    ex.set_defaults(func=cmd_export)
    b = sub.add_parser("bench", help="speed benchmarks against peers",
                       description="Run benchmarks/ (a source checkout): tables comparing aiayn with HF "
                       "Marian and CTranslate2 (pip install -e .[bench]) in one run.")
    b.add_argument("part", nargs="?", default="all", choices=["train", "decode", "lm", "all"],
                   help="which benchmark (default all)")
    b.add_argument("--quick", action="store_true", help="tiny models, a few steps: checks that it runs")
    b.add_argument("--configs", help="train/decode: model sizes, comma-separated (default small,base)")
    b.add_argument("--rounds", type=int, help="train/decode: measure every cell N times, keep the fastest")
    b.add_argument("--device", default="cpu", help="train/decode: cpu, cuda or cuda:N (on a GPU HF is the "
                   "peer; the LM benchmarks run on the CPU)")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("machine", help="what this machine computes natively, and which C kernels run here",
                       description="The device's native precisions and auto's choice, the threads, and "
                       "the C kernels: built or not, and each family's decision as timed on this CPU "
                       "(on, off, or up to which size; its speed-ups over PyTorch's operators).")
    m.add_argument("--device", default="cpu", help=DEVICE_HELP)
    m.add_argument("--retime", action="store_true", help="forget the kernels' timings for this CPU: each "
                   "family is timed again at its next use (after other work disturbed a first run, say)")
    m.set_defaults(func=cmd_machine)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a truncated input, a skipped update) as one line: `aiayn: warning: ...`."""
    print(f"aiayn: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args.show_help()
        return EXIT_USAGE
    from aiayn.fast.inference import TRAINING_PRIMITIVES, bound_primitive_caches
    from aiayn.memory import keep_freed_memory
    from aiayn.train.loop import TrainingError

    keep_freed_memory()  # each command's steps reuse what the last one freed
    if args.command == "train":  # a new GEMM shape nearly every batch: memory stays flat (before any oneDNN op)
        bound_primitive_caches(TRAINING_PRIMITIVES)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            status = args.func(args)
            sys.stdout.flush()  # (a reader that went away is seen here, not in Python's flush at exit)
            return status
    except (InputError, TrainingError) as e:  # the user's input, or a run that cannot go on: one line
        if os.environ.get("AIAYN_DEBUG") == "1":  # the traceback, for a bug report
            raise
        print(f"aiayn: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UserError) else EXIT_ERROR
    except BrokenPipeError:  # the reader went away (`aiayn ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
        return 128 + 13  # a SIGPIPE's exit status
    except OSError as e:
        if os.environ.get("AIAYN_DEBUG") == "1":
            raise
        print(f"aiayn: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("aiayn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
