"""vocab_tiling_chunks: the same loss and gradients as the untiled head, and a fraction of the
memory for a 128k vocabulary."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps

pytestmark = pytest.mark.cpu


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg.global_batch_size, cfg.seq_len)
    weights = (rng.random(shape) < 0.8).astype(np.float32)
    return {
        "inputs": rng.integers(0, cfg.vocab_size, shape).astype(np.int32),
        "targets": rng.integers(0, cfg.vocab_size, shape).astype(np.int32),
        "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape),
        "segment_ids": np.ones(shape, np.int32),
        "weights": weights,
    }


@pytest.mark.parametrize("objective", ["lm", "z_loss"])
def test_tiled_loss_and_gradients_equal_untiled(tmp_path, objective):
    extra = {"z_loss": 1e-3} if objective == "z_loss" else {}
    results = []
    for chunks in (1, 4):
        cfg = tiny_config(tmp_path, vocab_tiling_chunks=chunks, **extra)
        steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
        state = steps.init()
        batch = _batch(cfg)
        grad_fn = jax.jit(jax.value_and_grad(steps._loss, has_aux=True))
        (loss, (_, count, _)), grads = grad_fn(state["params"], state["rest"], batch)
        results.append((float(loss), float(count), jax.tree.map(np.asarray, grads)))
    (l1, c1, g1), (l4, c4, g4) = results
    assert c1 == c4
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g4, g1)


def test_tiling_cuts_the_step_memory_for_a_large_vocabulary(tmp_path):
    """vocab 128k, seq 4096, batch 1: the compiled train step's temporaries with 16 chunks are at
    most a quarter of the untiled ones (memory_analysis, no execution)."""
    temps = {}
    for chunks in (1, 16):
        cfg = tiny_config(
            tmp_path, vocab_size=128_000, seq_len=4096, max_position_embeddings=4096,
            global_batch_size=1, vocab_tiling_chunks=chunks, num_layers=1,
        )  # fmt: skip
        steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
        lowered = steps.train_step.lower(steps.abstract_with_sharding(), steps.abstract_batch())
        temps[chunks] = (
            lowered.compile(steps.compiler_options()).memory_analysis().temp_size_in_bytes
        )
    assert temps[16] <= temps[1] / 4, temps
