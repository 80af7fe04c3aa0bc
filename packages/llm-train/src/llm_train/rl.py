"""GRPO / GSPO training: rollouts from llm-serve's engine in this process, on the current weights.

One round: take `global_batch_size / num_generations` prompts, sample `num_generations`
completions of each through llm-serve's `Scheduler` (continuous batching over the engine's decode
slots) on the policy's current parameters (an unstacked decode view of the train state's weights:
one extra copy of the parameters in memory, nothing through disk), score them with the reward
functions, turn rewards into advantages per prompt group, compute the sampling policy's and (when
`grpo_beta` > 0) the reference's per-token log-probs, then take `grpo_num_iterations` policy updates
on that batch. `steps` counts rounds; checkpoints hold the train state and the prompt iterator.

Evaluation (`eval_fraction` > 0 holds prompts out, `eval_every` rounds): one greedy completion per
held-out prompt (the first `eval_batches x global_batch_size` of them, the same every time), scored
by the same reward functions: `eval_reward_mean`, `eval_reward_<function>`,
`eval_completion_length`.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import numpy as np
from flax import nnx

from llm_core import Config, ConfigError, unstack_layers
from llm_train import distributed
from llm_train.checkpoint import Checkpointer
from llm_train.data.pipeline import _pad_sft, _split_docs
from llm_train.data.sft import load_chat_template, open_records
from llm_train.data.sources import DataError
from llm_train.data.tokenizer import check_vocab, load_tokenizer
from llm_train.grpo import advantages
from llm_train.metrics import MetricsWriter
from llm_train.optim import make_optimizer
from llm_train.rewards import load_reward_functions
from llm_train.sharding import build_mesh, check_batch
from llm_train.step import Steps


def _serve():
    try:
        import llm_serve
    except ImportError:
        raise ConfigError(
            "objective=grpo samples with llm-serve's engine: pip install packages/llm-serve "
            "(or llm-train[rl])."
        ) from None
    return llm_serve


class Prompts:
    """Prompt records -> (prompt token ids, text, other fields), shuffled, repeated, resumable."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.template = load_chat_template(cfg.chat_template, cfg.tokenizer_path)
        records = open_records(cfg.dataset_kind, cfg.dataset_path, cfg.dataset_split)
        items = [self._encode(where, r) for where, r in records]
        try:
            train, held_out = _split_docs(items, cfg.eval_fraction, cfg.seed)
        except ValueError as err:
            raise ConfigError(f"{err} ({len(items)} prompt records)") from None
        self.eval_items = [] if held_out is None else list(held_out)
        self.items = list(train)
        ds = grain.MapDataset.source(self.items).shuffle(seed=cfg.seed).repeat()
        self.iter = iter(ds.to_iter_dataset())

    def _encode(self, where: str, record) -> tuple[list[int], str, dict]:
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{where}: a prompt record needs a 'prompt' field.")
        prompt = record["prompt"]
        if isinstance(prompt, list):
            if self.template is None:
                raise DataError(f"{where}: message-list prompt but no chat template.")
            text = self.template.render(prompt, add_generation_prompt=True)
            ids = self.tokenizer.tok.encode(text, add_special_tokens=False).ids
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            raise DataError(f"{where}: 'prompt' must be a string or a message list.")
        room = self.cfg.seq_len + 1 - self.cfg.max_completion_length
        if not ids or len(ids) > room:
            raise DataError(
                f"{where}: the prompt has {len(ids)} tokens; seq_len + 1 - max_completion_length "
                f"= {room} are available."
            )
        fields = {k: v for k, v in record.items() if k != "prompt"}
        return ids, text, fields

    def take(self, n: int) -> list[tuple[list[int], str, dict]]:
        return [next(self.iter) for _ in range(n)]


def _rows(cfg: Config, prompt_ids: list[int], completion: list[int]) -> dict[str, np.ndarray]:
    """prompt + completion as one padded row whose trained tokens are the completion's."""
    tokens = np.asarray(prompt_ids + completion, np.int32)
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(completion), np.int32)])
    return _pad_sft(cfg)({"tokens": tokens, "mask": mask})


def _rewards(fns, prompts, completions, fields) -> tuple[np.ndarray, dict[str, float]]:
    total = np.zeros(len(completions), np.float64)
    per_fn = {}
    columns = {k: [f.get(k) for f in fields] for k in {k for f in fields for k in f}}
    for name, fn in fns:
        values = np.asarray(fn(prompts, completions, **columns), np.float64)
        if values.shape != (len(completions),):
            raise ValueError(
                f"reward function {name} returned {values.shape[0] if values.ndim else 0} values "
                f"for {len(completions)} completions."
            )
        total += values
        per_fn[f"reward_{name}"] = float(values.mean())
    return total, per_fn


def _decode_view(steps: Steps, state) -> tuple:
    """(graphdef, params) of the unstacked decode view of the train state's current weights."""
    model = nnx.merge(steps.graphdef, state["params"], state["rest"])
    return nnx.split(unstack_layers(model))


def _generate(serve, scheduler, prompts: list, sampling, chunk: int) -> list[list[int]]:
    """Completions (token ids) of `prompts` [(ids, text, fields)] under `sampling`, `chunk`
    requests at a time (the scheduler's queue bound)."""
    out = []
    for start in range(0, len(prompts), chunk):
        reqs = [
            serve.Request(list(ids), sampling, lambda e: None)
            for ids, _, _ in prompts[start : start + chunk]
        ]
        for req in reqs:
            scheduler.submit(req)
        scheduler.run_until_idle()
        out.extend(r.generated for r in reqs)
    return out


def evaluate_rewards(cfg, serve, scheduler, tokenizer, reward_fns, prompts: list) -> dict:
    """eval_reward_mean, eval_reward_<function>, eval_completion_length: one greedy completion per
    prompt, scored by the run's reward functions."""
    greedy = serve.SamplingParams(max_tokens=cfg.max_completion_length, temperature=0.0)
    completions = _generate(serve, scheduler, prompts, greedy, cfg.global_batch_size)
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in completions]
    reward, per_fn = _rewards(reward_fns, [p[1] for p in prompts], texts, [p[2] for p in prompts])
    return {
        "eval_reward_mean": float(reward.mean()),
        **{f"eval_{k}": v for k, v in per_fn.items()},
        "eval_completion_length": float(np.mean([len(c) for c in completions])),
    }


def train_rl(cfg: Config, max_steps: int | None = None):
    """GRPO / GSPO training to `cfg.steps` rounds (see the module docstring); resumes if possible."""
    from llm_train.trainer import TrainResult, _global_batch, _save_config, run_dir

    serve = _serve()
    distributed.initialize(cfg)
    out_dir = run_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    reward_fns = load_reward_functions(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_vocab(tokenizer, cfg)
    prompts = Prompts(cfg, tokenizer)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.keep_checkpoints, False)
    writer = MetricsWriter(out_dir, cfg, cfg.steps)
    _save_config(cfg, out_dir)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(steps.abstract_with_sharding(), latest)
        prompts.iter.set_state(data_state)
        start = latest
    else:
        from llm_train import init_from

        state = init_from.state_from(steps, cfg) if cfg.init_from else steps.init()
        start = 0
    logps_fn = jax.jit(steps.token_logps)
    g = cfg.num_generations
    per_round = cfg.global_batch_size // g
    slots = cfg.global_batch_size
    max_len = -(-(cfg.seq_len + 1) // cfg.kv_page_size) * cfg.kv_page_size
    eos = None if tokenizer.eos_id is None else tokenizer.tok.id_to_token(tokenizer.eos_id)
    serve_tok = serve.Tokenizer(tokenizer.tok, eos)
    engine = scheduler = None
    result = TrainResult(out_dir, start, start)
    eval_prompts = prompts.eval_items[: cfg.eval_batches * cfg.global_batch_size]
    end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    try:
        for rnd in range(start, end):
            t0 = time.perf_counter()
            graphdef, decode_params = _decode_view(steps, state)
            if engine is None:
                engine = serve.Engine(
                    cfg, graphdef, decode_params, kv_cache_kind="contiguous", slots=slots,
                    max_len=max_len,
                )  # fmt: skip
                scheduler = serve.Scheduler(engine, decode_params, serve_tok, max_queue=slots)
            scheduler.params = decode_params
            batch_prompts = prompts.take(per_round)
            groups = []
            for i, (ids, _, _) in enumerate(batch_prompts):
                sampling = serve.SamplingParams(
                    max_tokens=cfg.max_completion_length,
                    temperature=cfg.rollout_temperature,
                    seed=cfg.seed * 1_000_003 + rnd * per_round * g + i * g,
                )
                reqs = [
                    serve.Request(list(ids), sampling.for_choice(j), lambda e: None)
                    for j in range(g)
                ]
                groups.append(scheduler.submit_group(reqs))
            scheduler.run_until_idle()
            t_roll = time.perf_counter() - t0
            completions = [r.generated for group in groups for r in group]
            texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in completions]
            prompt_texts = [p[1] for p in batch_prompts for _ in range(g)]
            fields = [p[2] for p in batch_prompts for _ in range(g)]
            reward, per_fn = _rewards(reward_fns, prompt_texts, texts, fields)
            adv = advantages(reward.reshape(per_round, g), cfg.grpo_advantage).reshape(-1)
            rows = [_rows(cfg, p[0], c) for p, c in zip(
                [p for p in batch_prompts for _ in range(g)], completions, strict=True)]  # fmt: skip
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            device = _global_batch(batch, steps.batch_sharding)
            device["advantages"] = _global_batch({"a": adv}, steps.row_sharding)["a"]
            old = logps_fn(state["params"], state["rest"], device)
            ref = old
            if cfg.grpo_beta:
                ref_params = steps._reference(state["params"], state.get("ref_params"))
                ref = logps_fn(ref_params, state["rest"], device)
            device = {**device, "old_logps": old, "ref_logps": ref}
            jax.block_until_ready(ref)
            t1 = time.perf_counter()
            t_logps = t1 - t0 - t_roll
            for _ in range(cfg.grpo_num_iterations):
                state, metrics = steps.run_train_step(state, device)
            metrics = jax.device_get(metrics)
            t_train = time.perf_counter() - t1
            loss = float(metrics["loss"])
            result.losses[rnd + 1], result.last_step = loss, rnd + 1
            lengths = np.asarray([len(c) for c in completions], np.float64)
            trained_tokens = float(batch["weights"].sum()) * cfg.grpo_num_iterations
            record = {
                "step": rnd + 1,
                "loss": loss,
                "grad_norm": float(metrics["grad_norm"]),
                "reward_mean": float(reward.mean()),
                "reward_std": float(reward.std()),
                **per_fn,
                "kl": float(metrics["grpo_kl"]),
                "clip_fraction": float(metrics["grpo_clip_fraction"]),
                "completion_length": float(lengths.mean()),
                "rollout_tokens_per_sec": float(lengths.sum()) / max(t_roll, 1e-9),
                "time_rollout": t_roll,
                "time_logps": t_logps,
                "time_update": t_train,
                "train_tokens_per_sec": trained_tokens / max(t_train, 1e-9),
                "tokens_per_sec": trained_tokens / max(time.perf_counter() - t0, 1e-9),
                "mfu": 0.0,
            }
            result.rewards[rnd + 1] = record["reward_mean"]
            writer.write(record)
            writer.progress(record)
            if cfg.eval_every and (rnd + 1) % cfg.eval_every == 0 and eval_prompts:
                scheduler.params = _decode_view(steps, state)[1]  # the updated weights
                ev = evaluate_rewards(cfg, serve, scheduler, tokenizer, reward_fns, eval_prompts)
                result.evals[rnd + 1] = ev
                writer.write({"step": rnd + 1, **ev})
                writer.message(f"eval round {rnd + 1}: reward {ev['eval_reward_mean']:.4f}")
            if cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0:
                ckpt.save(rnd + 1, state, prompts.iter.get_state())
        if result.last_step > start:
            ckpt.save(result.last_step, state, prompts.iter.get_state(), force=True)
    finally:
        ckpt.close()
        writer.close()
    return result
