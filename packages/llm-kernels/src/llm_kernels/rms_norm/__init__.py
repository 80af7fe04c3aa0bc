"""RMSNorm: fused C++ CPU kernels and a jnp reference."""

from llm_kernels.rms_norm.ops import rms_norm
from llm_kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
