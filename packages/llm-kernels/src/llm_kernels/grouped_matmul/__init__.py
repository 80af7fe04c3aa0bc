"""Grouped matmul for MoE experts: C++ CPU, Pallas TPU / GPU kernels and a ragged_dot reference."""

from llm_kernels.grouped_matmul.ops import grouped_matmul
from llm_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = ["gmm_reference", "grouped_matmul", "tgmm_reference"]
