"""Pretrained Transformers in and out: HF-format directories of MarianMTModel (OPUS-MT) and GPT-2
become aiayn models (`import_marian`, `import_gpt2`), and aiayn models become HF directories
(`export_hf`) or CTranslate2 model directories (`export_ct2`). What differs from the paper is carried
by ModelConfig's options (activation, positional layout, embedding scale, output bias, pre-norm,
LayerNorm epsilon): no second model class.

Nothing here needs `transformers`, and only `export_ct2` needs `ctranslate2`; the HF files are read
with json, safetensors, sentencepiece, `tokenizers`, and pickle-free torch.load(weights_only=True).
"""

from aiayn.interop.hf import InteropError
from aiayn.interop.ct2 import export_ct2
from aiayn.interop.gpt2 import export_gpt2, import_gpt2
from aiayn.interop.marian import export_marian, import_marian


def export_hf(model, tokenizer, task: str, out, extra: dict | None = None) -> str:
    """Write an aiayn model as an HF directory: a translation model as MarianMTModel, a language
    model as GPT2LMHeadModel. -> the architecture written."""
    if task == "translation":
        export_marian(model, tokenizer, out, extra or {})
        return "MarianMTModel"
    if task == "lm":
        export_gpt2(model, tokenizer, out)
        return "GPT2LMHeadModel"
    raise InteropError(f"a {task} model has no HF export (translation and lm models do)")


__all__ = ["InteropError", "import_marian", "import_gpt2", "export_marian", "export_gpt2", "export_hf", "export_ct2"]
