"""aiayn's fast paths, in one layer over the reference model (docs/DESIGN.md).

aiayn/model is plain PyTorch that reads like the paper. This package makes the same model faster
without changing its parameters or its results beyond rounding:

- modules.py: subclasses of the model's modules that try aiayn's C kernels (aiayn/kernels) first;
- onednn.py: fp32 training with the linear layers' GEMMs on oneDNN, where that is faster;
- inference.py: inference copies for a precision (oneDNN fp32/bf16, int8).

`accelerate(model)` turns a model's modules into their fast forms, in place, by class: the Trainer
calls it (through `for_training`) and `inference_model` on its copies. A model that neither touched
is the reference; tests run both and compare them (tests/fast/).
"""

from __future__ import annotations

from torch import nn

from aiayn.fast.modules import FAST


def accelerate(model: nn.Module) -> nn.Module:
    """In place: every module of `model` with a fast form (aiayn.fast.modules.FAST) becomes it. The
    parameters, buffers and state dict stay as they are. Returns the model."""
    for m in model.modules():
        fast = FAST.get(type(m))
        if fast is not None:
            m.__class__ = fast
    return model


def for_training(model: nn.Module, precision: str, device: str) -> nn.Module:
    """In place: `accelerate`, and on a CPU in fp32 the linear layers on oneDNN where its GEMMs train
    faster (aiayn.fast.onednn)."""
    from aiayn.fast.onednn import use_onednn_linears

    return use_onednn_linears(accelerate(model), precision, device)
