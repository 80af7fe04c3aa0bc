"""Context parallelism on 8 simulated CPU devices: attention with the sequence split over the
`context` axis (all_gather and ring, whose backward is its own second trip around the ring) equals
attention on one device, values and q / k / v / sink gradients, with
packed sequences, sliding windows, chunked attention, soft-capping and sinks."""

from test_sharding import _run_on_8_devices

SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from functools import partial
from jax.sharding import NamedSharding, PartitionSpec as P
from llm_core.layers import attention_ops as ops

b, s, h, kh, d = 2, 64, 4, 2, 16
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, kh, kh))
seg = np.ones((b, s), np.int32); seg[0, 23:] = 2; seg[1, 50:] = 0  # packed rows, padding
pos = np.zeros((b, s), np.int32)
for r in range(b):
    for i in range(1, s):
        pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
pos, seg = jnp.asarray(pos), jnp.asarray(seg)
sinks = jnp.asarray(rng.normal(size=(h,)), jnp.float32)
specs = {
    "causal": dict(),
    "window": dict(sliding_window=7),
    "chunk+softcap": dict(chunk=16, logit_softcap=5.0),
}
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("context",))  # as llm_core.create_mesh
worst = 0.0
for name, extra in specs.items():
    for with_sinks in (False, True):
        def loss(q, k, v, sk, spec):
            sk = sk if with_sinks else None
            out = ops.self_attention(q, k, v, pos, seg, spec, "dot_product", 2, sk)  # the ring takes keys 2 at a time
            return jnp.sum(out * jnp.cos(jnp.arange(d))), out
        base = ops.AttentionSpec(scale=d ** -0.5, **extra)
        grad = partial(jax.value_and_grad, argnums=(0, 1, 2, 3), has_aux=True)
        (_, want), g_want = grad(loss)(q, k, v, sinks, base)
        for strategy in ("all_gather", "ring"):
            spec = ops.AttentionSpec(scale=d ** -0.5, context_strategy=strategy, **extra)
            shard = NamedSharding(mesh, P(None, "context"))
            args = [jax.device_put(a, shard) for a in (q, k, v)]
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                f = jax.jit(grad(lambda q, k, v, sk: loss(q, k, v, sk, spec)))
                (_, got), g_got = f(*args, sinks)
                text = f.lower(*args, sinks).compile().as_text()
            assert ("collective-permute" in text) == (strategy == "ring"), (name, strategy)
            err = max(float(jnp.abs(a - b_).max()) for a, b_ in zip((got, *g_got), (want, *g_want)))
            assert err < 1e-5, (name, with_sinks, strategy, err)
            worst = max(worst, err)
print("ok", worst)
"""


def test_context_parallel_attention_equals_one_device():
    out = _run_on_8_devices(SCRIPT)
    assert "ok" in out, out


def test_load_balanced_order_pairs_early_and_late_chunks():
    import numpy as np

    from llm_core.layers.attention_ops import load_balanced_order

    order = load_balanced_order(16, 4)  # 8 chunks of 2: device i holds chunks i and 7 - i
    assert sorted(order) == list(range(16))
    slices = np.asarray(order).reshape(4, 4) // 2
    assert [sorted(set(s)) for s in slices.tolist()] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert load_balanced_order(16, 1) is None
