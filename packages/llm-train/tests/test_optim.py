import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from llm_train.optim import decay_mask, make_optimizer, make_schedule


def lrs(cfg):
    s = make_schedule(cfg)
    return np.array([float(s(i)) for i in range(cfg.steps + 1)])


def test_warmup_cosine(tmp_path):
    cfg = tiny_config(tmp_path, steps=20, warmup_steps=5, learning_rate=1.0, min_lr_ratio=0.1)
    lr = lrs(cfg)
    np.testing.assert_allclose(lr[:6], [0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)
    assert np.all(np.diff(lr[5:]) <= 1e-7)
    np.testing.assert_allclose(lr[20], 0.1, atol=1e-6)


def test_linear_constant_wsd(tmp_path):
    base = {"steps": 10, "warmup_steps": 0, "learning_rate": 1.0, "min_lr_ratio": 0.0}
    lin = lrs(tiny_config(tmp_path, lr_schedule="linear", **base))
    np.testing.assert_allclose(lin[[0, 5, 10]], [1.0, 0.5, 0.0], atol=1e-6)
    const = lrs(tiny_config(tmp_path, lr_schedule="constant", **base))
    np.testing.assert_allclose(const, 1.0)
    wsd = lrs(tiny_config(tmp_path, lr_schedule="wsd", decay_fraction=0.2, **base))
    np.testing.assert_allclose(wsd[:9], 1.0)  # stable for 8 steps, then decays over 2
    np.testing.assert_allclose(wsd[9:], [0.5, 0.0], atol=1e-6)


def test_decay_mask_skips_norms_and_biases():
    params = {
        "attn_norm": {"scale": jnp.ones(4)},
        "mlp": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
        "final_norm": jnp.ones(4),
    }
    mask = decay_mask(params)
    assert mask == {
        "attn_norm": {"scale": False},
        "mlp": {"kernel": True, "bias": False},
        "final_norm": False,
    }


def test_adamw_mask_works_on_nnx_state(tmp_path):
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 2)))
            self.norm = nnx.Param(jnp.ones(2))

    _, params = nnx.split(M(), nnx.Param)
    cfg = tiny_config(tmp_path, warmup_steps=0, learning_rate=0.1, weight_decay=0.5, grad_clip=0)
    tx = make_optimizer(cfg)
    zero = nnx.State({"w": nnx.Param(jnp.zeros((2, 2))), "norm": nnx.Param(jnp.zeros(2))})
    upd, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(upd["w"][...]).max()) > 0  # decayed
    assert float(jnp.abs(upd["norm"][...]).max()) == 0  # not decayed


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_optimizers_selectable(tmp_path, name):
    cfg = tiny_config(tmp_path, optimizer=name, warmup_steps=0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.ones((4, 4))}
    upd, _ = tx.update({"w": jnp.full((4, 4), 0.5)}, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.isfinite(np.asarray(new["w"])).all()
    assert float(jnp.abs(new["w"] - 1).max()) > 0


def test_global_norm_clipping(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optimizer="sgd",
        adam_b1=0.0,
        warmup_steps=0,
        learning_rate=1.0,
        grad_clip=1.0,
        lr_schedule="constant",
    )
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros(4)}
    upd, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(upd)), 1.0, rtol=1e-6)
