"""Weight-only int8 matmul: x @ (q * scale) without a float copy of q (C++ kernel on the CPU)."""

from llm_kernels.int8_matmul.ops import int8_matmul
from llm_kernels.int8_matmul.reference import int8_matmul_reference

__all__ = ["int8_matmul", "int8_matmul_reference"]
