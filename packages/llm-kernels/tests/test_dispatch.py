"""Backend dispatch and the fallback when the compiled module cannot be loaded."""

import importlib
import warnings

import jax
import jax.numpy as jnp
import pytest

import llm_kernels
from llm_kernels import _ffi, _platform
from llm_kernels.flash_attention import ops as attention_ops

pytestmark = pytest.mark.cpu


@pytest.fixture
def broken_module(monkeypatch):
    """Pretend the compiled module fails to import (e.g. built for another jaxlib)."""
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == _ffi._MODULE_NAME:
            raise ImportError("undefined symbol: XLA_FFI_fake (built for another jaxlib)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_ffi.importlib, "import_module", fake_import)
    monkeypatch.setattr(_ffi, "_module", None)
    monkeypatch.setattr(_ffi, "_loaded", False)
    monkeypatch.setattr(_ffi, "_load_error", None)


def test_missing_module_warns_once_and_falls_back(broken_module):
    with pytest.warns(RuntimeWarning, match=r"could not be loaded.*undefined symbol.*Rebuild"):
        assert not llm_kernels.cpu_kernels_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second call must stay silent
        assert not llm_kernels.cpu_kernels_available()
    q = jnp.ones((1, 4, 2, 8))
    jaxpr = str(jax.make_jaxpr(lambda q: llm_kernels.flash_attention(q, q, q))(q))
    assert "llm_kernels_attention_fwd" not in jaxpr
    out = llm_kernels.flash_attention(q, q, q)
    assert jnp.allclose(out, llm_kernels.mha_reference(q, q, q))
    x = jnp.ones((2, 8))
    assert jnp.allclose(llm_kernels.rms_norm(x, x[0]), llm_kernels.rms_norm_reference(x, x[0]))
    with pytest.raises(RuntimeError, match=r"backend='cpu'.*Rebuild"):
        llm_kernels.flash_attention(q, q, q, backend="cpu")
    with pytest.raises(RuntimeError, match="backend='cpu'"):
        llm_kernels.rms_norm(x, x[0], backend="cpu")
    assert llm_kernels.cpu_kernels_info()["available"] is False


def test_unsupported_platform_is_a_loud_error(monkeypatch):
    monkeypatch.setattr(_platform, "current_platform", lambda: "metal")
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(NotImplementedError, match="no kernel for platform 'metal'"):
        llm_kernels.flash_attention(q, q, q)
    # An explicit backend still works anywhere.
    assert llm_kernels.flash_attention(q, q, q, backend="reference").shape == q.shape


@pytest.mark.parametrize("platform,expected", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_platform_picks_pallas_kernel(monkeypatch, platform, expected):
    monkeypatch.setattr(_platform, "current_platform", lambda: platform)
    assert attention_ops.resolve_backend(None, interpret=False) == expected


def test_interpret_backends():
    assert attention_ops.resolve_backend(None, interpret=True) == "pallas_tpu"
    assert attention_ops.resolve_backend("pallas_gpu", interpret=True) == "pallas_gpu"
