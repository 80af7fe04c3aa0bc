"""sharded_flash_attention on a 2x2 CPU mesh (a subprocess: the device count is fixed at start)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu

SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import llm_kernels as lk
from llm_kernels.flash_attention.sharded import sharded_flash_attention
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
r = np.random.default_rng(0)
q = jnp.asarray(r.standard_normal((4, 24, 8, 16), dtype=np.float32))
k, v = (jnp.asarray(r.standard_normal((4, 24, 2, 16), dtype=np.float32)) for _ in range(2))
seg = jnp.asarray(np.repeat(np.arange(3), 8)[None].repeat(4, 0).astype(np.int32))
put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor", None)))
fn = jax.jit(sharded_flash_attention(mesh, batch_axes="data", head_axis="tensor", backend="cpu"))
out = fn(put(q), put(k), put(v), jax.device_put(seg, NamedSharding(mesh, P("data", None))))
ref = lk.mha_reference(q, k, v, segment_ids=seg)
g = jax.grad(lambda q: jnp.sum(fn(q, k, v, seg) ** 2))(put(q))
g_ref = jax.grad(lambda q: jnp.sum(lk.mha_reference(q, k, v, segment_ids=seg) ** 2))(q)
print(float(jnp.max(jnp.abs(out - ref))), float(jnp.max(jnp.abs(g - g_ref))), out.sharding.spec)
"""


def test_sharded_flash_attention_matches_reference():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    out_err, grad_err, spec = out.stdout.split(maxsplit=2)
    assert float(out_err) < 1e-5 and float(grad_err) < 5e-5
    assert "data" in spec and "tensor" in spec
