"""flash_attention rejects bad arguments with a ValueError that names the argument and shapes."""

import jax.numpy as jnp
import pytest

from llm_kernels import flash_attention

pytestmark = pytest.mark.cpu


def _arr(shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Q, KV = (2, 8, 4, 16), (2, 8, 2, 16)


@pytest.mark.parametrize(
    "q,k,v,kw,match",
    [
        (_arr((8, 4, 16)), _arr(KV), _arr(KV), {}, r"q must have rank 4.*q.shape=\(8, 4, 16\)"),
        (_arr(Q), _arr((2, 8, 2, 8)), _arr((2, 8, 2, 8)), {}, r"head_dim mismatch.*16 != .* 8"),
        (_arr(Q), _arr((2, 8, 3, 16)), _arr((2, 8, 3, 16)), {}, r"num_heads \(4\).*num_kv_heads \(3\)"),
        (_arr(Q), _arr((3, 8, 2, 16)), _arr((3, 8, 2, 16)), {}, r"batch mismatch.*2 != k/v batch 3"),
        (_arr(Q, jnp.int32), _arr(KV), _arr(KV), {}, r"q must be a floating dtype.*int32"),
        (_arr(Q), _arr(KV), _arr(KV, jnp.bfloat16), {}, r"share a dtype"),
        (_arr(Q), _arr(KV), _arr((2, 9, 2, 16)), {}, r"k and v must have the same shape"),
        (_arr(Q), _arr(KV), _arr(KV), {"sliding_window": 0}, r"sliding_window must be a positive"),
        (_arr(Q), _arr(KV), _arr(KV), {"sliding_window": -3}, r"sliding_window.*-3"),
        (_arr(Q), _arr(KV), _arr(KV), {"logit_soft_cap": 0.0}, r"logit_soft_cap must be > 0"),
        (_arr(Q), _arr(KV), _arr(KV), {"block_q": 0}, r"block_q must be a positive int"),
        (_arr(Q), _arr(KV), _arr(KV), {"backend": "cuda"}, r"unknown backend 'cuda'"),
        (
            _arr(Q), _arr(KV), _arr(KV), {"segment_ids": _arr((2, 7), jnp.int32)},
            r"segment_ids must have shape \[batch, seq\]=\(2, 8\).*\(2, 7\)",
        ),
        (
            _arr(Q), _arr(KV), _arr(KV), {"segment_ids": _arr((2, 8), jnp.float32)},
            r"segment_ids must be int32.*float32",
        ),
        (
            _arr(Q), _arr((2, 9, 2, 16)), _arr((2, 9, 2, 16)),
            {"segment_ids": _arr((2, 8), jnp.int32)}, r"segment_ids require q_len == kv_len",
        ),
        (_arr(Q), _arr(KV), _arr(KV), {"interpret": True, "backend": "cpu"}, r"interpret=True"),
    ],
)  # fmt: skip
def test_bad_arguments(q, k, v, kw, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kw)


def test_numpy_scalars_are_accepted():
    import numpy as np

    q = jnp.ones(Q)
    kv = jnp.ones(KV)
    out = flash_attention(
        q, kv, kv, sliding_window=np.int64(3), sm_scale=np.float32(0.2), block_q=np.int32(16)
    )
    assert out.shape == Q
