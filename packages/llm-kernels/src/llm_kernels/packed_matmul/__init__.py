"""Float32 matmul on weights packed in column panels (C++ kernel on the CPU): serving's decode."""

from llm_kernels.packed_matmul.ops import packed_matmul
from llm_kernels.packed_matmul.reference import (
    pack_panels,
    packed_matmul_reference,
    unpack_panels,
)

__all__ = ["pack_panels", "packed_matmul", "packed_matmul_reference", "unpack_panels"]
