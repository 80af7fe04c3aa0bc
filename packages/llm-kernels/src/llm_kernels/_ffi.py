"""Loads the compiled CPU module and registers its XLA FFI targets (CPU platform only).

A missing or broken module (not built, or built against another jaxlib) must not break
``import llm_kernels``: we warn once, say how to rebuild, and every op falls back to its
jax.numpy reference.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import jax

_MODULE_NAME = "llm_kernels._cpu_kernels"
REBUILD_HINT = (
    "Rebuild it with `pip install --force-reinstall --no-deps packages/llm-kernels` (or "
    "`uv pip install ./packages/llm-kernels`) from the repository root, in the environment "
    "that has the jax you run."
)

_module: ModuleType | None = None
_load_error: str | None = None
_loaded = False


def _load() -> None:
    global _module, _load_error, _loaded
    _loaded = True
    try:
        module = importlib.import_module(_MODULE_NAME)
        for name, capsule in module.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as e:  # ImportError, missing symbols, registration failures
        _module, _load_error = None, f"{type(e).__name__}: {e}"
        warnings.warn(
            f"llm_kernels: the compiled CPU kernels ({_MODULE_NAME}) could not be loaded "
            f"({_load_error}); falling back to the jax.numpy reference implementations. "
            + REBUILD_HINT,
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _module, _load_error = module, None


def cpu_kernels_available() -> bool:
    """True when the C++ FFI kernels are compiled, loaded and registered."""
    if not _loaded:
        _load()
    return _module is not None


def cpu_kernels_info() -> dict[str, object]:
    """What was loaded: availability, the SIMD build in use, thread count, or the load error."""
    if not cpu_kernels_available():
        return {"available": False, "error": _load_error}
    assert _module is not None
    return {"available": True, "isa": _module.isa(), "num_threads": _module.num_threads()}


def require_cpu_kernels(op: str) -> None:
    """Raise a clear error when an explicit backend="cpu" asks for missing kernels."""
    if not cpu_kernels_available():
        raise RuntimeError(
            f"{op}(backend='cpu') needs the compiled C++ kernels, which failed to load "
            f"({_load_error}). " + REBUILD_HINT
        )
