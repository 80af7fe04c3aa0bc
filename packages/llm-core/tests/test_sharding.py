"""Every parameter carries logical axis names; a sharded forward on 8 CPU devices equals 1 device."""

import os
import subprocess
import sys
import textwrap

from flax import nnx

from llm_core import build_model, load_config
from llm_core.config.schema import DEFAULT_LOGICAL_AXIS_RULES


def test_every_param_has_known_logical_axes():
    cfg = load_config(
        "gemma3-1b",
        [
            "num_layers=7",
            "emb_dim=64",
            "num_heads=4",
            "num_kv_heads=2",
            "head_dim=16",
            "mlp_dim=96",
            "vocab_size=97",
            "sliding_window=4",
        ],
    )
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    known = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES} | {None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
        assert set(axes) <= known, (path, axes)
        assert (axes[0] == "layers") == (path[0] in ("groups", "dense_groups")), path


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from llm_core import build_model, create_mesh, load_config, state_shardings
    cfg = load_config("bench-small.yml", ["num_layers=2", "emb_dim=64", "num_heads=4", "num_kv_heads=2",
        "head_dim=16", "mlp_dim=128", "vocab_size=256", "ici_data_parallelism=2", "ici_tensor_parallelism=2"])
    ids = jax.random.randint(jax.random.key(0), (4, 16), 0, 256)
    ref = build_model(cfg, rngs=nnx.Rngs(0))(ids)
    mesh = create_mesh(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh, cfg)
    state = jax.jit(lambda: nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings)()
    q = state["groups"]["layer_0"]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding.spec
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    print("ok", dict(mesh.shape))
""")


MOE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from llm_core import build_model, create_mesh, load_config, state_shardings
    cfg = load_config(None, ["num_layers=2", "emb_dim=64", "num_heads=4", "num_kv_heads=2",
        "head_dim=16", "mlp_dim=128", "vocab_size=256", "ffn_kind=moe", "num_experts=4",
        "num_experts_per_tok=2", "moe_mlp_dim=32", "ici_expert_parallelism=2",
        "ici_tensor_parallelism=2"])
    ids = jax.random.randint(jax.random.key(0), (4, 16), 0, 256)
    ref_logits, _, ref_aux = build_model(cfg, rngs=nnx.Rngs(0)).forward(ids)
    mesh = create_mesh(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh, cfg)
    state = jax.jit(lambda: nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings)()
    up = state["groups"]["layer_0"]["mlp"]["up"]["kernel"][...]
    assert up.sharding.spec[1] == "expert", up.sharding.spec
    logits, _, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, ids)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(aux["moe_lb_loss"], ref_aux["moe_lb_loss"], rtol=1e-5)
    print("ok", dict(mesh.shape))
""")


def _run_on_8_devices(script: str) -> str:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_sharded_forward_matches_single_device():
    out = _run_on_8_devices(SCRIPT)
    assert "ok" in out and "'tensor': 2" in out


def test_expert_sharded_moe_forward_matches_single_device():
    """Experts split over the `expert` mesh axis (and tensor over experts' width): same logits."""
    out = _run_on_8_devices(MOE_SCRIPT)
    assert "ok" in out and "'expert': 2" in out
