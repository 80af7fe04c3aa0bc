"""Weight-only quantization of Linear modules: grouped int4 packs two values per byte exactly,
dequantizes within half a step of every weight, and an Int4Linear model computes exactly the float
model with the dequantized weights; a group size that does not divide an input size is a config
error. (Quality against the float model: tests/test_end_to_end.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import ConfigError, build_model, load_config
from llm_core.layers.quantize import Int4Linear, dequantize_int4, quantize_int4

TINY = dict(
    vocab_size=97, emb_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=96, seq_len=16, max_position_embeddings=32,
)  # fmt: skip


@pytest.mark.parametrize(
    "shape,n_lead,in_shape", [((64, 48), 0, (64,)), ((3, 8, 4, 24), 1, (8, 4))]
)
def test_int4_round_trip_is_within_half_a_step(shape, n_lead, in_shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    packed, scale = quantize_int4(w, n_lead, in_shape, 16)
    assert packed.dtype == jnp.uint8 and packed.shape[n_lead] == int(np.prod(in_shape)) // 2
    back = np.asarray(dequantize_int4(packed, scale, n_lead, in_shape, jnp.float32))
    assert back.shape == w.shape
    step = np.repeat(np.asarray(scale), 16, axis=n_lead).reshape(w.shape)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    # re-quantizing the dequantized weights gives the same bytes (the packing is exact)
    again, _ = quantize_int4(back, n_lead, in_shape, 16)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(packed))


def test_int4_model_close_to_float_and_bad_group_size():
    cfg = load_config(None, TINY)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    q4 = build_model(cfg.replace(weight_quantization="int4", weight_quantization_group_size=32),
                     rngs=nnx.Rngs(0))  # fmt: skip
    assert any(isinstance(n, Int4Linear) for _, n in nnx.iter_graph(q4))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 12)), jnp.int32)
    a, b = np.asarray(model(ids)), np.asarray(q4(ids))
    assert np.abs(a - b).max() > 1e-4  # quantized...
    # ...and exactly the float model with the dequantized weights in its kernels
    quantized = {path: n for path, n in nnx.iter_graph(q4) if isinstance(n, Int4Linear)}
    for path, node in nnx.iter_graph(model):
        if path in quantized:
            node.kernel[...] = quantized[path].weight(jnp.float32)
    np.testing.assert_allclose(np.asarray(model(ids)), b, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="weight_quantization_group_size=48"):
        build_model(cfg.replace(weight_quantization="int4", weight_quantization_group_size=48),
                    rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ConfigError, match="weight_quantization_group_size"):
        load_config(None, {**TINY, "weight_quantization_group_size": 3})


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_on_the_cpu_kernel_equals_its_dequantized_matmul(monkeypatch, mode):
    import importlib

    import jax

    import llm_kernels

    if not llm_kernels.cpu_kernels_available():
        pytest.skip("C++ kernels not built")
    ops = importlib.import_module(f"llm_kernels.{mode}_matmul.ops")
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    cfg = load_config(
        None, [*overrides, f"weight_quantization={mode}", "weight_quantization_group_size=16"]
    )
    model = build_model(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8)).astype(np.int32)
    graphdef, state = nnx.split(model)
    target = f"llm_kernels_{mode}_matmul"

    def run() -> tuple[np.ndarray, str]:  # a new function each time: no cached trace
        forward = jax.jit(lambda s: nnx.merge(graphdef, s)(ids))
        return np.asarray(forward(state)), str(jax.make_jaxpr(forward)(state))

    with_kernel, jaxpr = run()
    assert target in jaxpr
    monkeypatch.setattr(ops, "CPU_MAX_ROWS", 0)  # every call on XLA's dequantize-then-matmul
    without, jaxpr = run()
    assert target not in jaxpr
    np.testing.assert_allclose(with_kernel, without, rtol=1e-5, atol=1e-5)
