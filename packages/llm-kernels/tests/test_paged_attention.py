"""paged_attention: the Mosaic kernel in interpret mode and the reference against
flash_attention's reference on the gathered (contiguous) cache."""

import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err, rand

from llm_kernels import mha_reference, paged_attention, paged_attention_reference

pytestmark = pytest.mark.cpu


def _cache(rng, batch=3, heads=4, kv_heads=2, dim=16, page=8, pages_per_seq=4, pool=16):
    q = rand(rng, (batch, heads, dim))
    k_pages = rand(rng, (kv_heads, pool, page, dim))
    v_pages = rand(rng, (kv_heads, pool, page, dim))
    page_indices = jnp.asarray(
        rng.permutation(pool)[: batch * pages_per_seq].reshape(batch, pages_per_seq), jnp.int32
    )
    lengths = jnp.asarray([1, 19, page * pages_per_seq][:batch], jnp.int32)
    return q, k_pages, v_pages, lengths, page_indices


def _contiguous_reference(q, k_pages, v_pages, lengths, page_indices, **kw):
    """Each sequence separately through mha_reference: its last token attends its prefix."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k = jnp.concatenate([k_pages[:, p] for p in np.asarray(page_indices[b])], axis=1)[:, :n]
        v = jnp.concatenate([v_pages[:, p] for p in np.asarray(page_indices[b])], axis=1)[:, :n]
        out = mha_reference(q[b][None, None], k.swapaxes(0, 1)[None], v.swapaxes(0, 1)[None],
                            causal=True, **kw)  # fmt: skip
        outs.append(out[0, 0])
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "kw", [{}, {"sliding_window": 5, "logit_soft_cap": 3.0}], ids=["plain", "window-softcap"]
)
def test_paged_reference_and_kernel(kw):
    args = _cache(np.random.default_rng(0))
    want = _contiguous_reference(*args, **kw)
    assert max_err(paged_attention_reference(*args, **kw), want) < 1e-5
    assert max_err(paged_attention(*args, **kw), want) < 1e-5  # CPU default: reference
    assert max_err(paged_attention(*args, interpret=True, **kw), want) < 1e-5


def test_paged_mqa_and_empty_sequence():
    q, k_pages, v_pages, lengths, page_indices = _cache(np.random.default_rng(1), kv_heads=1)
    lengths = lengths.at[0].set(0)
    out = paged_attention(q, k_pages, v_pages, lengths, page_indices, interpret=True)
    assert float(jnp.max(jnp.abs(out[0]))) == 0.0
    want = paged_attention_reference(q, k_pages, v_pages, lengths, page_indices)
    assert max_err(out, want) < 1e-5


def test_paged_validation():
    q, k_pages, v_pages, lengths, page_indices = _cache(np.random.default_rng(2))
    with pytest.raises(
        ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"
    ):
        paged_attention(
            q, k_pages[:1].repeat(3, 0), v_pages[:1].repeat(3, 0), lengths, page_indices
        )
    with pytest.raises(ValueError, match="must be int32"):
        paged_attention(q, k_pages, v_pages, lengths.astype(jnp.float32), page_indices)
