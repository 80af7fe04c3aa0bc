"""Plan and compile: per-device memory and FLOPs before compiling; ahead-of-time compile report.

The state terms (params, optimizer state, gradients) are exact: they are the per-device shard sizes
of the real abstract train state under the configured mesh. Activations are an analytic estimate of
what the backward pass keeps per layer under the remat policy, plus the logits and one layer's
working set.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from llm_core import Config, bubble_fraction, count_params, layer_placement, shard_count
from llm_train.metrics import flops_per_token
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh, check_batch, data_parallel_size
from llm_train.step import Steps

GIB = 1024**3


def _per_device_bytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _activation_bytes(cfg: Config, mesh) -> dict[str, float]:
    """Bytes per device the backward pass holds: saved per-layer tensors, logits, working set."""
    b = cfg.global_batch_size // cfg.grad_accum_steps / data_parallel_size(mesh)
    # context parallelism: each device keeps its slice of the queries (and of every activation);
    # sequence parallelism: heads and MLP columns split over tensor x sequence inside the matmuls,
    # the residual stream (what is d wide) split over `sequence` on the length axis as well
    sp = mesh.shape.get("sequence", 1)
    s = cfg.seq_len / mesh.shape.get("context", 1)
    d, m, h = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads
    hd, kv = cfg.resolved_head_dim, cfg.resolved_num_kv_heads
    if cfg.attention_kind == "mla":  # the expanded form: per-head keys and values
        hd, kv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, h

    def split(n: int, axis: str) -> float:  # n heads or columns on one device, as the rules split
        return n / shard_count(n, axis, cfg.logical_axis_rules, mesh)

    act = jnp.dtype(cfg.dtype).itemsize
    # per token, per layer, every intermediate of a decoder layer (elements); d-wide ones / sp
    qh, kvh, mm = split(h, "heads") * hd, split(kv, "kv_heads") * hd, split(m, "mlp")
    matmul_outs = qh + 2 * kvh + d / sp + (3 * mm if cfg.gated_mlp else 2 * mm)
    # rotated q/k, and the MLP's product (llm_core's gated VJP recomputes the activation; a plain
    # MLP keeps its activation and the down projection's input)
    rope_and_gates = qh + kvh + (mm if cfg.gated_mlp else 2 * mm)
    norms_residual = 4 * d / sp
    # three tensors against every key: scores, masked scores and probabilities (measured against
    # the compiled step; the ring keeps none: its backward recomputes each block's)
    ring = mesh.shape.get("context", 1) > 1 and cfg.context_parallel_strategy == "ring"
    scores = 0 if ring else 3 * split(h, "heads") * cfg.seq_len
    per_token = matmul_outs + rope_and_gates + norms_residual + scores + qh
    full_layer = b * s * per_token * act
    saved_per_layer = {
        "none": full_layer,
        "full": b * s * d / sp * act,
        "save_dots": b * s * (matmul_outs + d / sp) * act,
        "save_dots_no_batch": b * s * (matmul_outs + d / sp) * act,
        "offload_dots": b * s * d / sp * act,
    }[cfg.remat_policy]
    stages, micro = pipeline_shape(cfg, mesh)
    # a stage keeps its own layers' tensors for every tick of the schedule (GPipe; the idle ticks
    # run on zeros and are saved too: M * V + S - 1 ticks of one microbatch for M * V of work),
    # plus the pipeline's input, hand-over and output buffers (three copies of the hidden states)
    ticks = micro * cfg.num_pipeline_repeats
    layers = cfg.num_layers / stages * saved_per_layer * (ticks + stages - 1) / ticks
    buffers = 3 * b * s * d / sp * act if stages > 1 else 0.0
    # one layer recomputed at a time (pipelined too: the compiled backward was measured to keep
    # about a whole batch's layer, not one microbatch's)
    working = 0.0 if cfg.remat_policy == "none" else full_layer
    # float32 logits, softmax and their gradient: vocab over `tensor`, tokens over `sequence`
    logits = 3 * b * s / sp * cfg.vocab_size / mesh.shape.get("tensor", 1) * 4
    return {"layers": layers + buffers, "working": working, "logits": logits}


def _gathered_bytes(cfg: Config, params, stages: int) -> float:
    """Whole weights and their whole gradients held beside the shards. Scanned layers are gathered
    one layer group at a time (compiled FSDP=8 steps of 4 and 8 layers hold the same 4-6 MiB
    beyond state and activations); the embedding and head stay whole through the step. Pipeline
    stages gather nothing, yet their compiled steps were measured to hold about twice the
    difference between whole and shard over every layer (PP=4 x DP=2: 0.078 GiB planned without
    it, 0.092 compiled), so that term stays in for them: measured, not explained."""

    def full_minus_shard(tree) -> float:
        whole = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
        return whole - _per_device_bytes(tree)

    if stages > 1:
        return 2 * full_minus_shard(params)
    stacked = {s.name: s.repeats for s in layer_placement(cfg).segments if s.stacked}
    group = max((full_minus_shard(params[n]) / r for n, r in stacked.items()), default=0.0)
    rest = full_minus_shard({k: v for k, v in params.items() if k not in stacked})
    return 2 * group + rest


def pipeline_shape(cfg: Config, mesh) -> tuple[int, int]:
    """(stages, microbatches) of the run; (1, 1) without pipeline parallelism."""
    stages = mesh.shape.get("stage", 1)
    return stages, (cfg.num_pipeline_microbatches or stages) if stages > 1 else 1


def plan(cfg: Config) -> dict:
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    state = steps.abstract_with_sharding()
    params = _per_device_bytes(state["params"])
    act = _activation_bytes(cfg, mesh)
    out = {
        "mesh": {k: v for k, v in mesh.shape.items() if v > 1} or {"(one device)": 1},
        "devices": mesh.size,
        "parameters": count_params(cfg),
        "active_parameters": count_params(cfg, active=True),
        "params_bytes": params,
        "optimizer_bytes": _per_device_bytes(state["opt_state"]),
        "gradients_bytes": params,
        "activations_bytes": act["layers"] + act["working"] + act["logits"],
        "flops_per_token": flops_per_token(cfg),
        "remat_policy": cfg.remat_policy,
    }
    stages, micro = pipeline_shape(cfg, mesh)
    if stages > 1:
        out["pipeline"] = {
            "stages": stages,
            "microbatches": micro,
            "repeats": cfg.num_pipeline_repeats,
            "bubble_fraction": bubble_fraction(stages, micro, cfg.num_pipeline_repeats),
        }
    out["gathered_bytes"] = _gathered_bytes(cfg, state["params"], stages)
    out["total_bytes"] = out["gathered_bytes"] + sum(
        out[k] for k in ("params_bytes", "optimizer_bytes", "gradients_bytes", "activations_bytes")
    )
    return out


def plan_table(p: dict) -> str:
    rows = [
        ("mesh", " x ".join(f"{k}={v}" for k, v in p["mesh"].items())),
        ("parameters", f"{p['parameters'] / 1e6:,.2f} M"),
        ("remat policy", p["remat_policy"]),
    ]
    if p["active_parameters"] != p["parameters"]:  # MoE: what one token uses
        rows.insert(2, ("active parameters", f"{p['active_parameters'] / 1e6:,.2f} M"))
    if "pipeline" in p:
        pp = p["pipeline"]
        rows.append((
            "pipeline",
            f"{pp['stages']} stages x {pp['repeats']} repeats, {pp['microbatches']} microbatches, "
            f"bubble {pp['bubble_fraction']:.1%} of each stage's ticks",
        ))  # fmt: skip
    for key in ("params", "optimizer", "gradients", "activations", "gathered", "total"):
        rows.append((f"{key} / device", f"{p[key + '_bytes'] / GIB:,.3f} GiB"))
    rows.append(("train FLOPs / token", f"{p['flops_per_token'] / 1e9:,.3f} GFLOP"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def compile_step(cfg: Config):
    """(compiled train step, seconds to lower + compile) for the configured mesh, without running."""
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    t = time.perf_counter()
    compiled = steps.train_step.lower(
        steps.abstract_with_sharding(), steps.abstract_batch()
    ).compile()
    return compiled, time.perf_counter() - t


def compiled_bytes(compiled) -> int:
    """Per-device peak the compiler reports: arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def compile_report(cfg: Config) -> str:
    compiled, seconds = compile_step(cfg)
    m = compiled.memory_analysis()
    est = plan(cfg)
    lines = [
        f"compiled the train step for {jax.device_count()} {jax.devices()[0].platform} devices in {seconds:.1f}s",
        f"arguments  {m.argument_size_in_bytes / GIB:,.3f} GiB / device",
        f"outputs    {m.output_size_in_bytes / GIB:,.3f} GiB (aliased {m.alias_size_in_bytes / GIB:,.3f})",
        f"temporary  {m.temp_size_in_bytes / GIB:,.3f} GiB",
        f"peak       {compiled_bytes(compiled) / GIB:,.3f} GiB / device (plan: {est['total_bytes'] / GIB:,.3f})",
    ]
    return "\n".join(lines)
