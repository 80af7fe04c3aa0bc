"""Weight-only grouped int4 matmul: x @ W without a float copy of W (C++ kernel on the CPU)."""

from llm_kernels.int4_matmul.ops import int4_matmul
from llm_kernels.int4_matmul.reference import dequantize_int4, int4_matmul_reference

__all__ = ["dequantize_int4", "int4_matmul", "int4_matmul_reference"]
