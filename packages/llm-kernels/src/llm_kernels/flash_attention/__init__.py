"""Flash attention: Pallas TPU/GPU kernels, a C++ CPU kernel and a jnp reference."""

from llm_kernels.flash_attention.ops import flash_attention
from llm_kernels.flash_attention.reference import mha_reference

__all__ = ["flash_attention", "mha_reference"]
