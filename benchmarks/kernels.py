"""CPU benchmark of the llm_kernels C++ FFI kernels against XLA's compiled jnp references.

Attention baseline: jax.nn.dot_product_attention(implementation="xla"), jitted (the faster of
it and our mha_reference). RMSNorm baseline: rms_norm_reference, jitted.

Prints, per shape, the time and peak extra resident memory of each implementation, measured in
the same run, and the ratio XLA / C++ (> 1 means the C++ kernel is faster / leaner).

    python benchmarks/kernels.py            # seq 512, 2048, 8192 + RMSNorm [8192, 4096]
    python benchmarks/kernels.py --quick    # seq 512, 2048 + a smaller RMSNorm, fewer repeats

Memory: XLA's temporaries + outputs of the compiled program (compiled.memory_analysis()) plus
the peak scratch the C++ kernels allocate themselves (counted by the module), inputs excluded. Do not run this next to the test suite: both want every core.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import llm_kernels
from llm_kernels import flash_attention, rms_norm, rms_norm_reference


def _scratch_module():
    from llm_kernels import _ffi

    return _ffi._module


def measure(fn: Callable, args: tuple, repeats: int) -> tuple[float, float]:
    """(best seconds per call, peak MiB) of a jitted fn.

    Memory = XLA's temporaries + outputs of the compiled program (memory_analysis) + the peak
    scratch the C++ kernels allocate themselves (counted in csrc/scratch.h). Inputs excluded.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    xla_bytes = stats.temp_size_in_bytes + stats.output_size_in_bytes
    module = _scratch_module()
    module.reset_scratch_peak()
    best = math.inf
    for i in range(repeats + 1 if repeats > 1 else 1):  # a warm-up call unless repeats == 1
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i > 0 or repeats == 1:
            best = min(best, time.perf_counter() - start)
    peak_mib = (xla_bytes + module.scratch_peak_bytes()) / 2**20
    return best, peak_mib


def _row(name: str, ours: tuple[float, float], xla: tuple[float, float], flops: float) -> None:
    (t_c, m_c), (t_x, m_x) = ours, xla
    gf = f"{flops / t_c / 1e9:7.1f} / {flops / t_x / 1e9:6.1f}" if flops else " " * 16
    print(
        f"{name:<28} {t_c * 1e3:9.1f} {t_x * 1e3:9.1f} {t_x / t_c:6.2f}x   {gf}"
        f" {m_c:9.1f} {m_x:9.1f}"
    )


def bench_attention(seqs: list[int], repeats: int, heads: int = 8, dim: int = 64) -> None:
    print(f"\nflash attention, causal, batch 1, {heads} heads, head_dim {dim}, float32")
    print(
        f"{'case':<28} {'C++ ms':>9} {'XLA ms':>9} {'XLA/C++':>7}  {'GFLOP/s C++/XLA':>16}"
        f" {'C++ MiB':>9} {'XLA MiB':>9}"
    )
    rng = np.random.default_rng(0)
    for seq in seqs:
        q, k, v = (
            jnp.asarray(rng.standard_normal((1, seq, heads, dim), dtype=np.float32))
            for _ in range(3)
        )
        flops = 2 * 2 * seq * seq * dim * heads / 2  # causal half of QK^T and PV

        def cpu_fwd(q, k, v):
            return flash_attention(q, k, v, causal=True, backend="cpu")

        def xla_fwd(q, k, v):  # XLA's own dot-product attention (2x faster than mha_reference)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

        def loss(fn):
            return jax.value_and_grad(lambda a, b, c: jnp.sum(fn(a, b, c)), argnums=(0, 1, 2))

        reps = repeats if seq < 8192 else 1
        ours = measure(cpu_fwd, (q, k, v), reps)
        xla = measure(xla_fwd, (q, k, v), reps)
        _row(f"seq {seq} fwd", ours, xla, flops)
        ours = measure(loss(cpu_fwd), (q, k, v), reps)
        xla = measure(loss(xla_fwd), (q, k, v), reps)
        _row(f"seq {seq} fwd+bwd", ours, xla, 3.5 * flops)


def bench_rms_norm(shape: tuple[int, int], repeats: int) -> None:
    print(f"\nRMSNorm {list(shape)}, float32")
    print(
        f"{'case':<28} {'C++ ms':>9} {'XLA ms':>9} {'XLA/C++':>7}  {'':>16} {'C++ MiB':>9} {'XLA MiB':>9}"
    )
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(shape[-1:], dtype=np.float32))

    def cpu(x, w):
        return rms_norm(x, w, backend="cpu")

    def grad(fn):
        return jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * x), argnums=(0, 1))

    _row("fwd", measure(cpu, (x, w), repeats), measure(rms_norm_reference, (x, w), repeats), 0)
    xla_grad = measure(grad(rms_norm_reference), (x, w), repeats)
    _row("fwd+bwd", measure(grad(cpu), (x, w), repeats), xla_grad, 0)
    default = measure(grad(rms_norm), (x, w), repeats)  # XLA forward + C++ backward
    _row("fwd+bwd default (XLA fwd)", default, xla_grad, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: seq 512 and 2048")
    parser.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths")
    parser.add_argument("--only", choices=["attention", "rms_norm"], help="run one benchmark")
    args = parser.parse_args()
    info = llm_kernels.cpu_kernels_info()
    if not info["available"]:
        raise SystemExit(f"C++ kernels not available: {info['error']}")
    print(f"jax {jax.__version__}, C++ kernels: {info}")
    seqs = args.seqs or ([512, 2048] if args.quick else [512, 2048, 8192])
    repeats = 2 if args.quick else 3
    if args.only != "rms_norm":
        bench_attention(seqs, repeats)
    if args.only != "attention":
        bench_rms_norm((2048, 4096) if args.quick else (8192, 4096), repeats)


if __name__ == "__main__":
    main()
