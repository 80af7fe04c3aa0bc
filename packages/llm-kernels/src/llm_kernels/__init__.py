"""llm_kernels: attention, normalisation, MoE grouped-matmul and int8 / int4 / packed matmul kernels.

Public API: ``flash_attention``, ``rms_norm``, ``paged_attention``, ``decode_attention``, ``grouped_matmul``,
``int8_matmul``, ``int4_matmul``, ``packed_matmul`` (+ ``pack_panels``, ``unpack_panels``) (and their references ``mha_reference``, ``rms_norm_reference``,
``paged_attention_reference``, ``gmm_reference``, ``tgmm_reference``, ``int8_matmul_reference``,
``int4_matmul_reference``, ``packed_matmul_reference``), ``sharded_flash_attention``, ``cpu_kernels_available``, ``cpu_kernels_info``.
Importing registers the C++ XLA FFI targets for the CPU platform when the compiled module loads,
and otherwise warns once and keeps the jax.numpy fallbacks.
"""

from llm_kernels._ffi import cpu_kernels_available, cpu_kernels_info
from llm_kernels.flash_attention import flash_attention, mha_reference
from llm_kernels.flash_attention.sharded import sharded_flash_attention
from llm_kernels.grouped_matmul import gmm_reference, grouped_matmul, tgmm_reference
from llm_kernels.int4_matmul import int4_matmul, int4_matmul_reference
from llm_kernels.int8_matmul import int8_matmul, int8_matmul_reference
from llm_kernels.packed_matmul import (
    pack_panels,
    packed_matmul,
    packed_matmul_reference,
    unpack_panels,
)
from llm_kernels.paged_attention import (
    decode_attention,
    paged_attention,
    paged_attention_reference,
)
from llm_kernels.rms_norm import rms_norm, rms_norm_reference

cpu_kernels_available()  # load + register now, so a broken build warns at import time

__version__ = "0.1.0"
__all__ = [
    "cpu_kernels_available",
    "cpu_kernels_info",
    "decode_attention",
    "flash_attention",
    "gmm_reference",
    "grouped_matmul",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "mha_reference",
    "pack_panels",
    "packed_matmul",
    "packed_matmul_reference",
    "paged_attention",
    "paged_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "sharded_flash_attention",
    "tgmm_reference",
    "unpack_panels",
]
