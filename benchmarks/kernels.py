"""CPU benchmark of the llm_kernels C++ FFI kernels against XLA's compiled jnp references.

Attention baseline: jax.nn.dot_product_attention(implementation="xla"), jitted (the faster of
it and our mha_reference). RMSNorm baseline: rms_norm_reference, jitted.

Prints, per shape, the time and peak extra resident memory of each implementation, measured in
the same run, and the ratio XLA / C++ (> 1 means the C++ kernel is faster / leaner).

Grouped matmul (MoE experts, 4096 tokens, float32): our C++ kernel against jax.lax.ragged_dot and
against a dense batched matmul doing the same useful FLOPs (the ceiling: equal groups as one
[groups, rows, k] x [groups, k, n] einsum), forward and forward+backward; implementations
interleaved per round, median of 3 rounds, with the CPU model and load average printed around it.

    python benchmarks/kernels.py            # seq 512, 2048, 8192 + RMSNorm [8192, 4096]
    python benchmarks/kernels.py --quick    # seq 512, 2048 + a smaller RMSNorm, fewer repeats
    python benchmarks/kernels.py --only grouped_matmul
    python benchmarks/kernels.py --only int8_matmul
    python benchmarks/kernels.py --only int4_matmul
    python benchmarks/kernels.py --only packed_matmul
    python benchmarks/kernels.py --only decode_attention

int8 / int4 matmul (weight-only serving, float32 activations): our C++ kernels against XLA's program
for the same jnp code (dequantize, then matmul; int4 grouped by 128 inputs, two values per byte), on
bench-small's projection and head shapes at decode (1 and 8 rows) and prefill (64 rows) sizes;
interleaved, median of 5 rounds, with the weight bytes the kernel reads per second.

packed matmul (serving's float32 weights in 32-column panels): our C++ kernel against XLA's matmul on
the row-major weight, on the same shapes, and with bfloat16 weights (bfloat16 panels against XLA's
bfloat16 matmul); each call multiplies x by every weight of a set of about
200 MB (so the weights stream from memory, as in a decode step), all inside one jitted program.

decode attention (one decode step over bench-small's 8 layers of float32 or bfloat16 cache: 8 heads, 4
kv heads, dim 64): the C++ kernel, which reads each row's own keys in place, against what ran before it, XLA's
head-major einsums over the whole cache length, masked (llm-core's `decode_attention`, use_kernel=False),
and for paged pools the jnp reference, which gathers every row's pages; equal and ragged lengths.

Memory: XLA's temporaries + outputs of the compiled program (compiled.memory_analysis()) plus
the peak scratch the C++ kernels allocate themselves (counted by the module), inputs excluded. Do not run this next to the test suite: both want every core.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import llm_kernels
from llm_kernels import flash_attention, grouped_matmul, rms_norm, rms_norm_reference


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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# (experts, top-k, d_model, expert width) from the grouped-matmul issue, 4096 tokens.
GMM_SHAPES = [(8, 2, 1024, 2816), (64, 8, 1024, 512)]
RAGGED_DOT_MAX_TEMP_GIB = 10.0  # ragged_dot runs with at most this many GiB of temporaries


def _interleaved(
    fns: dict[str, Callable], args: tuple, rounds: int, calls: int = 1
) -> dict[str, float | None]:
    """Median seconds per call of each compiled fn, the fns interleaved within each round (each
    timing the mean of `calls` calls)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        if fn is not None:
            jax.block_until_ready(fn(*args))  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            if fn is None:
                continue
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) / calls)
    return {n: statistics.median(t) if t else None for n, t in times.items()}


def _compile_or_skip(fn: Callable, args: tuple, max_gib: float | None):
    compiled = jax.jit(fn).lower(*args).compile()
    temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
    if max_gib is not None and temp_gib > max_gib:
        return None, temp_gib
    return compiled, temp_gib


def bench_grouped_matmul(rounds: int, tokens: int = 4096) -> None:
    print(f"\ngrouped matmul, float32, {tokens} tokens, routing drawn at random (uneven groups)")
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    print(
        f"{'case':<34} {'C++ ms':>8} {'ragged ms':>9} {'dense ms':>8} {'ragged/C++':>10}"
        f" {'C++/ceiling':>11}  {'GFLOP/s C++ / ragged / dense':>28}"
    )
    rng = np.random.default_rng(0)
    for shape in GMM_SHAPES:
        _bench_gmm_shape(*shape, tokens=tokens, rounds=rounds, rng=rng)
    print(f"load average after: {load_average()}")


def _bench_gmm_shape(experts, top_k, d_model, width, *, tokens, rounds, rng) -> None:
    m = tokens * top_k
    choice = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]  # k distinct experts
    sizes = jnp.asarray(np.bincount(choice.reshape(-1), minlength=experts), jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((m, d_model), dtype=np.float32))
    rhs = jnp.asarray(rng.standard_normal((experts, d_model, width), dtype=np.float32) * 0.03)
    flops = 2.0 * m * d_model * width

    def ours(a, b):
        return grouped_matmul(a, b, sizes, backend="cpu")

    def ragged(a, b):
        return jax.lax.ragged_dot(a, b, sizes)

    def dense(a, b):  # same useful FLOPs, equal groups: the ceiling
        return jnp.einsum("gmk,gkn->gmn", a.reshape(experts, m // experts, d_model), b)

    def fwd_bwd(fn):
        return jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), argnums=(0, 1))

    for label, wrap, mult in (("fwd", lambda f: f, 1.0), ("fwd+bwd", fwd_bwd, 3.0)):
        fns, notes = {}, ""
        fns["ours"], _ = _compile_or_skip(wrap(ours), (lhs, rhs), None)
        fns["ragged"], temp = _compile_or_skip(wrap(ragged), (lhs, rhs), RAGGED_DOT_MAX_TEMP_GIB)
        if fns["ragged"] is None:
            notes = f"  (ragged_dot skipped: needs {temp:.1f} GiB of temporaries)"
        fns["dense"], _ = _compile_or_skip(wrap(dense), (lhs, rhs), None)
        t = _interleaved(fns, (lhs, rhs), rounds)
        f = flops * mult
        t_r = t["ragged"]
        ratio_r = f"{t_r / t['ours']:9.2f}x" if t_r else f"{'-':>10}"
        gf_r = f"{f / t_r / 1e9:6.1f}" if t_r else f"{'-':>6}"
        print(
            f"E={experts} k={top_k} {d_model}x{width} {label:<8}"[:34].ljust(34)
            + f" {t['ours'] * 1e3:8.1f} {(t_r or 0) * 1e3:9.1f} {t['dense'] * 1e3:8.1f}"
            f" {ratio_r} {t['dense'] / t['ours']:10.2f}x "
            f" {f / t['ours'] / 1e9:8.1f} / {gf_r} / {f / t['dense'] / 1e9:6.1f}{notes}"
        )


WEIGHT_ONLY_SHAPES = [(1, 512, 1408), (1, 512, 32000), (8, 512, 1408), (8, 512, 32000),
                      (64, 512, 1408)]  # fmt: skip


def bench_weight_only_matmul(mode: str, rounds: int = 5, group: int = 128) -> None:
    """int8 (per-channel) or int4 (grouped, two per byte) weights: C++ kernel vs XLA's program."""
    import importlib

    ops = importlib.import_module(f"llm_kernels.{mode}_matmul.ops")
    kernel = getattr(llm_kernels, f"{mode}_matmul")
    reference = getattr(llm_kernels, f"{mode}_matmul_reference")
    from train import matmul_ceiling

    ceiling = matmul_ceiling()
    print(f"\n{mode} matmul, CPU {cpu_model()}, load average {load_average()}, fp32 matmul "
          f"ceiling (2048^3, jax, this run) {ceiling / 1e9:,.1f} GFLOP/s")  # fmt: skip
    print(f"(the default backend takes the kernel up to {ops.CPU_MAX_ROWS} rows)")
    rng = np.random.default_rng(0)
    for rows, k, n in WEIGHT_ONLY_SHAPES:
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
        if mode == "int8":
            q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
            scale = jnp.asarray(rng.uniform(0.001, 0.02, n), jnp.float32)
        else:
            q = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
            scale = jnp.asarray(rng.uniform(0.001, 0.02, (k // group, n)), jnp.float32)
        fns = {
            "c++": jax.jit(lambda x, q, s: kernel(x, q, s, backend="cpu")),
            "xla": jax.jit(reference),
        }
        t = _interleaved(fns, (x, q, scale), rounds)
        gf = {side: 2 * rows * k * n / t[side] / 1e9 for side in t}
        print(
            f"  [{rows:3d}, {k}] x [{k}, {n:5d}]: c++ {t['c++'] * 1e3:7.3f} ms "
            f"({q.nbytes / t['c++'] / 1e9:5.1f} GB/s of {mode} weights, {gf['c++']:5.1f} GFLOP/s "
            f"= {100e9 * gf['c++'] / ceiling:4.1f}% of the ceiling), xla {t['xla'] * 1e3:7.3f} ms "
            f"({gf['xla']:5.1f} GFLOP/s = {100e9 * gf['xla'] / ceiling:4.1f}%), "
            f"xla / c++ {t['xla'] / t['c++']:5.2f}x"
        )
    print(f"load average after: {load_average()}")


def bench_packed_matmul(rounds: int = 5) -> None:
    """Float32 weights packed in panels (C++ kernel) vs row-major (XLA), streamed from memory."""
    from train import matmul_ceiling

    ceiling = matmul_ceiling()
    print(f"\npacked matmul, CPU {cpu_model()}, load average {load_average()}, fp32 matmul "
          f"ceiling (2048^3, jax, this run) {ceiling / 1e9:,.1f} GFLOP/s")  # fmt: skip
    rng = np.random.default_rng(0)
    for rows, k, n in WEIGHT_ONLY_SHAPES:
        copies = max(2, int(200e6 // (k * n * 4)))
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
        ws = [jnp.asarray(rng.normal(size=(k, n)), jnp.float32) for _ in range(copies)]
        panels = [llm_kernels.pack_panels(w) for w in ws]

        def ours(x, panels, n=n):
            return sum(llm_kernels.packed_matmul(x, p, n, backend="cpu") for p in panels)

        def xla(x, ws):
            return sum(x @ w for w in ws)

        t_ours = _interleaved({"c++": jax.jit(ours)}, (x, panels), rounds)["c++"] / copies
        t_xla = _interleaved({"xla": jax.jit(xla)}, (x, ws), rounds)["xla"] / copies
        gb = k * n * 4 / 1e9
        gf = {side: 2 * rows * k * n / t / 1e9 for side, t in (("c++", t_ours), ("xla", t_xla))}
        print(
            f"  [{rows:3d}, {k}] x [{k}, {n:5d}] ({copies} weights): c++ {t_ours * 1e3:7.3f} ms "
            f"({gb / t_ours:5.1f} GB/s, {gf['c++']:5.1f} GFLOP/s = "
            f"{100e9 * gf['c++'] / ceiling:4.1f}%), xla {t_xla * 1e3:7.3f} ms ({gb / t_xla:5.1f} "
            f"GB/s, {gf['xla']:5.1f} GFLOP/s), xla / c++ {t_xla / t_ours:5.2f}x"
        )
        # bfloat16 weights: panels widened in the kernel vs XLA's bf16 x bf16 matmul (the model's)
        ws16 = [w.astype(jnp.bfloat16) for w in ws]
        panels16 = [p.astype(jnp.bfloat16) for p in panels]
        t16 = _interleaved({"c++": jax.jit(ours)}, (x, panels16), rounds)["c++"] / copies
        x16 = x.astype(jnp.bfloat16)
        t16_xla = _interleaved({"xla": jax.jit(xla)}, (x16, ws16), rounds)["xla"] / copies
        print(
            f"        bfloat16 weights: c++ {t16 * 1e3:7.3f} ms ({gb / 2 / t16:5.1f} GB/s), xla "
            f"{t16_xla * 1e3:7.3f} ms, xla / c++ {t16_xla / t16:5.2f}x; c++ float32 / bfloat16 "
            f"{t_ours / t16:4.2f}x"
        )
    print(f"load average after: {load_average()}")


# (what, each row's length, cache length) for bench_decode_attention
DECODE_CASES = [
    ("batch 1, 2048 of 2048", [2048], 2048),
    ("batch 8, 1024 each of 1024", [1024] * 8, 1024),
    ("batch 8, 2000 + 7 x 100 of 2048", [2000] + [100] * 7, 2048),
]


def _decode_contiguous(spec, use_kernel: bool) -> Callable:
    """llm-core's decode attention summed over the layers' contiguous caches."""
    from llm_core.layers.attention_ops import decode_attention

    def fn(q, ks, vs, lengths, *_):
        pos = (lengths - 1)[:, None]
        outs = [decode_attention(q[:, None], k, v, pos, spec, use_kernel=use_kernel)
                for k, v in zip(ks, vs, strict=True)]  # fmt: skip
        return sum(outs)

    return jax.jit(fn)


def _decode_paged(backend: str) -> Callable:
    """llm_kernels.paged_attention summed over the layers' page pools."""

    def fn(q, _ks, _vs, lengths, kps, vps, table):
        outs = [llm_kernels.paged_attention(q, k, v, lengths, table, backend=backend)
                for k, v in zip(kps, vps, strict=True)]  # fmt: skip
        return sum(outs)

    return jax.jit(fn)


def _decode_operands(rng, lens, cache_len, layers, heads, kv_heads, dim, page):
    """(q, ks, vs, lengths, k pools, v pools, table): each row's pages a shuffled block of a pool."""
    b = len(lens)
    q = jnp.asarray(rng.normal(size=(b, heads, dim)), jnp.float32)
    shape = (b, kv_heads, cache_len, dim)
    ks = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(layers)]
    vs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(layers)]
    per_row = cache_len // page
    perm = rng.permutation(b * per_row)
    pools = [
        [jnp.swapaxes(c, 0, 1).reshape(kv_heads, b * per_row, page, dim)[:, perm] for c in cs]
        for cs in (ks, vs)
    ]
    table = jnp.asarray(np.argsort(perm).reshape(b, per_row), jnp.int32)
    return q, ks, vs, jnp.asarray(lens, jnp.int32), pools[0], pools[1], table


def _float_as(dtype, a):
    return a.astype(dtype) if a.dtype == jnp.float32 else a


def bench_decode_attention(rounds: int = 5, layers: int = 8, page: int = 16) -> None:
    """C++ decode attention against XLA's masked einsums (contiguous) and the gathering jnp
    reference (paged), each summed over `layers` caches inside one program, as in a decode step."""
    from llm_core.layers.attention_ops import AttentionSpec

    heads, kv_heads, dim = 8, 4, 64
    spec = AttentionSpec(scale=dim**-0.5)
    print(f"\ndecode attention, {layers} layers of float32 or bfloat16 cache, {heads} heads / {kv_heads} kv "
          f"heads of {dim}, pages of {page}; CPU {cpu_model()}, load average {load_average()}")  # fmt: skip
    fns = {"c++": _decode_contiguous(spec, True), "xla": _decode_contiguous(spec, False),
           "c++ paged": _decode_paged("cpu"), "jnp paged": _decode_paged("reference")}  # fmt: skip
    rng = np.random.default_rng(0)
    for (what, lens, cache_len), dtype in itertools.product(DECODE_CASES, ("float32", "bfloat16")):
        args = _decode_operands(rng, lens, cache_len, layers, heads, kv_heads, dim, page)
        args = jax.tree.map(functools.partial(_float_as, dtype), args)
        t = _interleaved(fns, args, rounds, calls=20)
        size = jnp.dtype(dtype).itemsize
        gb = sum(min(n, cache_len) for n in lens) * kv_heads * dim * size * 2 * layers / 1e9
        print(f"  {what}, {dtype}: c++ {t['c++'] * 1e3:6.2f} ms ({gb / t['c++']:5.1f} GB/s of live K/V), "
              f"xla {t['xla'] * 1e3:6.2f} ms, xla / c++ {t['xla'] / t['c++']:5.2f}x; paged: c++ "
              f"{t['c++ paged'] * 1e3:6.2f} ms, jnp {t['jnp paged'] * 1e3:6.2f} ms, jnp / c++ "
              f"{t['jnp paged'] / t['c++ paged']:5.2f}x")  # fmt: skip
    print(f"load average after: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: seq 512 and 2048")
    parser.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths")
    parser.add_argument(
        "--only",
        choices=[
            "attention",
            "rms_norm",
            "grouped_matmul",
            "int8_matmul",
            "int4_matmul",
            "packed_matmul",
            "decode_attention",
        ],
        help="run one benchmark",
    )
    args = parser.parse_args()
    info = llm_kernels.cpu_kernels_info()
    if not info["available"]:
        raise SystemExit(f"C++ kernels not available: {info['error']}")
    print(f"jax {jax.__version__}, C++ kernels: {info}")
    seqs = args.seqs or ([512, 2048] if args.quick else [512, 2048, 8192])
    repeats = 2 if args.quick else 3
    if args.only in (None, "attention"):
        bench_attention(seqs, repeats)
    if args.only in (None, "rms_norm"):
        bench_rms_norm((2048, 4096) if args.quick else (8192, 4096), repeats)
    if args.only in (None, "grouped_matmul"):
        bench_grouped_matmul(rounds=3)
    for mode in ("int8", "int4"):
        if args.only in (None, f"{mode}_matmul"):
            bench_weight_only_matmul(mode)
    if args.only in (None, "packed_matmul"):
        bench_packed_matmul()
    if args.only in (None, "decode_attention"):
        bench_decode_attention()


if __name__ == "__main__":
    main()
