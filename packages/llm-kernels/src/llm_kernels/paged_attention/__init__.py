"""Paged decode attention: a Mosaic Pallas kernel and a jnp reference (the CPU default)."""

from llm_kernels.paged_attention.ops import paged_attention
from llm_kernels.paged_attention.reference import paged_attention_reference

__all__ = ["paged_attention", "paged_attention_reference"]
