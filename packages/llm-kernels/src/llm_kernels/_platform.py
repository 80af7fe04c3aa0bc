"""Which platform an op runs on, and the backend dispatch every kernel op shares."""

from __future__ import annotations

import jax


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu' (or whatever else JAX reports, which the ops reject loudly)."""
    platform = jax.default_backend()
    if platform in ("cuda", "rocm"):
        return "gpu"
    return platform


PALLAS_BACKENDS = ("pallas_tpu", "pallas_gpu")


def resolve_backend(op: str, backend: str | None, interpret: bool, reference: str) -> str:
    """The backend `op` runs: interpret=True -> a Pallas kernel in the interpreter (TPU-style by
    default); an explicit backend as asked ("cpu" only when the C++ kernels loaded); otherwise by
    platform: Pallas on TPU / GPU, the C++ kernel on CPU (or "reference" when it is not built).
    Any other platform is a loud error; `reference` names the jnp fallback in that message."""
    from llm_kernels import _ffi

    if interpret:
        backend = backend or "pallas_tpu"
        if backend not in PALLAS_BACKENDS:
            raise ValueError(
                f"{op}: interpret=True runs a Pallas kernel; backend must be "
                f"'pallas_tpu' or 'pallas_gpu', got {backend!r}"
            )
        return backend
    if backend is not None:
        if backend == "cpu":
            _ffi.require_cpu_kernels(op)
        return backend
    platform = current_platform()
    if platform in ("tpu", "gpu"):
        return f"pallas_{platform}"
    if platform == "cpu":
        return "cpu" if _ffi.cpu_kernels_available() else "reference"
    raise NotImplementedError(
        f"{op}: no kernel for platform {platform!r}; supported: cpu, gpu, tpu. "
        f"Pass backend='reference' to use {reference}."
    )
