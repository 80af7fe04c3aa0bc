"""shard_map wrapper for flash_attention: XLA cannot partition a Pallas call or an FFI custom
call, so without this a sharded input would be gathered onto every device first.

Attention is independent per batch row and per kv-head group, so sharding batch over the data
axes and heads over the tensor axis needs no communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from llm_kernels.flash_attention.ops import flash_attention


def sharded_flash_attention(
    mesh: Mesh,
    *,
    batch_axes: str | Sequence[str] | None = ("data",),
    head_axis: str | None = None,
    **attention_kwargs,
) -> Callable[..., jax.Array]:
    """flash_attention(q, k, v, segment_ids=None) run per shard under jax.shard_map.

    q/k/v batch dims are split over ``batch_axes`` and head dims over ``head_axis``; num_kv_heads
    must be divisible by the head axis size so each shard keeps whole GQA groups.
    Other keyword arguments (causal, sliding_window, backend, ...) go to flash_attention.
    """
    batch = tuple(batch_axes) if isinstance(batch_axes, Sequence) and not isinstance(
        batch_axes, str
    ) else batch_axes  # fmt: skip
    qkv_spec = P(batch, None, head_axis, None)
    seg_spec = P(batch, None)
    head_size = 1 if head_axis is None else mesh.shape[head_axis]

    def run(q, k, v, segment_ids=None):
        if k.shape[2] % head_size:
            raise ValueError(
                f"sharded_flash_attention: num_kv_heads ({k.shape[2]}) must be divisible by the "
                f"size of mesh axis {head_axis!r} ({head_size})"
            )

        def local(q, k, v, *seg):
            return flash_attention(q, k, v, segment_ids=seg[0] if seg else None, **attention_kwargs)

        specs = (qkv_spec,) * 3 + ((seg_spec,) if segment_ids is not None else ())
        args = (q, k, v) + ((segment_ids,) if segment_ids is not None else ())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(
            *args
        )

    return run
