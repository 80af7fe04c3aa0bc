"""llm-convert: Hugging Face <-> native checkpoints, streamed tensor by tensor, with logit checks."""

from llm_convert.adapters import save_peft_adapter
from llm_convert.api import (
    hf_to_native,
    load_hf,
    native_to_hf,
    quantize_native,
    read_hf,
    save_hf,
)
from llm_convert.errors import ConversionError
from llm_convert.families import FAMILIES

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ConversionError",
    "__version__",
    "hf_to_native",
    "load_hf",
    "native_to_hf",
    "quantize_native",
    "read_hf",
    "save_hf",
    "save_peft_adapter",
]
