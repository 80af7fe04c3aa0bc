"""Decode attention over a paged or contiguous KV cache: a Mosaic Pallas kernel (paged), a C++ CPU
kernel that reads each row's own length in place, and a jnp reference."""

from llm_kernels.paged_attention.ops import decode_attention, paged_attention
from llm_kernels.paged_attention.reference import paged_attention_reference

__all__ = ["decode_attention", "paged_attention", "paged_attention_reference"]
