"""The train state, the loss on packed batches, and the jit-compiled train / eval steps."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llm_core import Config, LoRAParam, RouterBias, lora_dropout_key
from llm_train.dpo import dpo_loss
from llm_train.grpo import policy_loss
from llm_train.model import build_model
from llm_train.router_balance import update_router_bias
from llm_train.sharding import batch_sharding, state_shardings
from llm_train.vocab_tiling import target_logprobs

# A batch: int32 [B, S] arrays `inputs`, `targets`, `positions`, `segment_ids` (0 = padding) and
# float32 [B, S] `weights` (1 where the target is a real next token of the same segment).
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
# GRPO batches add the rollout's float32 per-completion advantages [B] and, per token [B, S], the
# log-probs of the policy that sampled them and of the reference (see grpo.py).
GRPO_KEYS = ("advantages", "old_logps", "ref_logps")


def batch_keys(cfg: Config) -> tuple[str, ...]:
    return BATCH_KEYS + (GRPO_KEYS if cfg.objective == "grpo" else ())


def token_loss(logits, targets, weights, z_loss: float = 0.0):
    """Sums over real tokens: (negative log-likelihood, z-loss term, token count)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum((log_z - target_logit) * weights)
    zl = z_loss * jnp.sum(jnp.square(log_z) * weights)
    return nll, zl, jnp.sum(weights)


def moe_statistics(aux: dict, count) -> dict:
    """Token-weighted sums of the router statistics of one (micro)batch (see finish_moe_statistics)."""
    load = aux["moe_tokens_per_expert"]
    return {
        "moe_lb_loss": aux["moe_lb_loss"] * count,
        "moe_z_loss": aux["moe_z_loss"] * count,
        # busiest expert's share of assignments relative to a perfectly even share (1.0 = balanced)
        "moe_max_load": load.max() / jnp.maximum(load.mean(), 1e-9) * count,
        "moe_dropped_fraction": aux["moe_dropped"] / jnp.maximum(load.sum(), 1.0) * count,
    }


def shift_left(x, k: int):
    """x[:, i + k] at position i (zeros past the end)."""
    return jnp.pad(x[:, k:], ((0, 0), (0, k)))


def mtp_loss(logps: list, weights):
    """Mean over depths of each depth's mean cross-entropy. Depth k (0-based) at position i
    predicts targets[:, i + k + 1]: it counts only where that target and every one before it from
    position i on are real next tokens of the same sequence (weights of positions i .. i + k + 1)."""
    losses, valid = [], weights
    for k, logp in enumerate(logps):
        valid = valid * shift_left(weights, k + 1)
        losses.append(-jnp.sum(logp * valid) / jnp.maximum(jnp.sum(valid), 1.0))
    return jnp.mean(jnp.stack(losses))


def finish_moe_statistics(stats: dict, tokens) -> dict:
    return {key: value / tokens for key, value in stats.items()}


def _split_model(model):
    """(graphdef, trained parameters, the rest). With LoRA (`lora_rank` > 0) only the adapters
    train: the base weights go to the rest, so they get neither gradients nor optimizer state.
    MoE routers' expert-choice biases (`RouterBias`) are never trained: router_balance.py moves
    them."""
    trained = LoRAParam if model.cfg.lora_rank > 0 else nnx.All(nnx.Param, nnx.Not(RouterBias))
    return nnx.split(model, trained, ...)


def abstract_model(cfg: Config):
    """(graphdef, abstract params, abstract rest) without allocating anything."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(cfg.seed)))
    return _split_model(model)


class Steps:
    """Everything compiled for one run: state creation, the train step and the eval step."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation):
        self.cfg, self.mesh, self.tx = cfg, mesh, tx
        self.graphdef, abs_params, abs_rest = abstract_model(cfg)
        self.abstract_state = jax.eval_shape(lambda: self._fresh(abs_params, abs_rest))
        self.state_sharding = state_shardings(self.abstract_state, mesh, cfg)
        self.batch_sharding = batch_sharding(mesh)
        # per-row arrays ([B]: GRPO advantages) split like the batch's first axis
        self.row_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(self.batch_sharding.spec[0])
        )
        batch_sh = {
            k: self.row_sharding if k == "advantages" else self.batch_sharding
            for k in batch_keys(cfg)
        }
        self._init_jit = jax.jit(self._init, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_sharding, batch_sh),
            out_shardings=(self.state_sharding, None),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, batch_sh))
        self._compiling = self._compiled = None

    # ------------------------------------------------------------------ ahead-of-time compile
    def abstract_batch(self) -> dict:
        shape = (self.cfg.global_batch_size, self.cfg.seq_len)

        def one(k):
            if k == "advantages":
                return jax.ShapeDtypeStruct(shape[:1], jnp.float32, sharding=self.row_sharding)
            dtype = (
                jnp.int32 if k in ("inputs", "targets", "positions", "segment_ids") else jnp.float32
            )
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)

        return {k: one(k) for k in batch_keys(self.cfg)}

    @staticmethod
    def compiler_options() -> dict:
        """On the CPU, LLVM's -O1 compiles ~2x faster than -O3 with the same step time and the same
        numbers (measured on bench-small); other backends keep their defaults."""
        if jax.devices()[0].platform == "cpu":
            return {"xla_backend_optimization_level": 1}
        return {}

    def init(self):
        """A fresh train state, created sharded (compiled, then run)."""
        return self._init_jit.lower().compile(self.compiler_options())()

    def start_compile(self) -> None:
        """Compile the train step in a background thread (it overlaps with state creation)."""
        lowered = self.train_step.lower(self.abstract_with_sharding(), self.abstract_batch())

        def compile_timed():
            t = time.perf_counter()
            compiled = lowered.compile(self.compiler_options())
            self.compile_seconds = time.perf_counter() - t
            return compiled

        self._pool = ThreadPoolExecutor(1)
        self._compiling = self._pool.submit(compile_timed)

    def wait_compiled(self) -> float | None:
        """Wait for `start_compile`'s compile (so the first step's time is the step's own); its
        seconds, or None when none was started."""
        if self._compiling is None:
            return None
        self._compiled = self._compiling.result()
        self._compiling = None
        self._pool.shutdown()
        return self.compile_seconds

    def run_train_step(self, state, batch):
        """The train step: the AOT-compiled one when `start_compile` ran, else the jitted one."""
        self.wait_compiled()
        if self._compiled is not None:
            return self._compiled(state, batch)
        return self.train_step(state, batch)

    # ------------------------------------------------------------------ state
    def _fresh(self, params, rest) -> dict[str, Any]:
        state = {
            "params": params,
            "rest": rest,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.cfg.seed)),
        }
        if self.needs_reference_copy:  # DPO without LoRA: a frozen copy of the starting weights
            state["ref_params"] = jax.tree.map(
                lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a, params
            )  # (abstract leaves when traced by eval_shape for the state's shapes)
        return state

    @property
    def needs_reference_copy(self) -> bool:
        cfg = self.cfg
        wants = cfg.objective == "dpo" or (cfg.objective == "grpo" and cfg.grpo_beta > 0)
        return wants and cfg.lora_rank == 0

    def _reference(self, params, ref):
        """DPO's reference parameters: the frozen copy, or with LoRA the base model (adapters set
        to zero), so LoRA needs no second copy of the weights."""
        if ref is not None:
            return ref
        return jax.tree.map(jnp.zeros_like, params)

    def _init(self):
        with nnx.use_eager_sharding(False):
            model = build_model(self.cfg, rngs=nnx.Rngs(self.cfg.seed))
        _, params, rest = _split_model(model)
        return self._fresh(params, rest)

    def abstract_with_sharding(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_sharding,
        )

    # ------------------------------------------------------------------ loss and steps
    def _loss(self, params, rest, batch, ref=None, dropout_key=None):
        """(summed loss, (summed nll, token count, summed aux statistics)). Router losses (MoE) are
        per-token means from the model; they enter the summed loss x the token count, so after the
        division by all tokens they weigh `moe_*_loss_weight` whatever the accumulation. The forward
        is traced under the run's mesh, so MoE layers see the `expert` axis (expert parallelism).
        `dropout_key` (train steps with lora_dropout > 0) switches LoRA dropout on."""
        with lora_dropout_key(dropout_key):
            return self._objective(params, rest, batch, ref)

    def _objective(self, params, rest, batch, ref):
        cfg = self.cfg
        if cfg.objective == "dpo":
            return self._dpo_loss(params, rest, batch, ref)
        if cfg.objective == "grpo":
            return self._grpo_loss(params, rest, batch)
        logp, log_z, aux = self._target_logprobs(params, rest, batch)
        weights = batch["weights"]
        nll, count = -jnp.sum(logp * weights), jnp.sum(weights)
        loss = nll + cfg.z_loss * jnp.sum(jnp.square(log_z) * weights)
        stats = {}
        if "mtp_logps" in aux:  # multi-token prediction: weighted like the router losses
            mtp = mtp_loss(aux.pop("mtp_logps"), weights)
            loss += count * cfg.mtp_loss_scaling_factor * mtp
            stats["mtp_loss"] = mtp * count
        if aux:
            loss += count * (
                cfg.moe_aux_loss_weight * aux["moe_lb_loss"]
                + cfg.moe_z_loss_weight * aux["moe_z_loss"]
            )
            stats = moe_statistics(aux, count)
            if "router_load" in aux:  # summed over micro-batches, then used by the bias update
                stats["router_load"] = jax.lax.stop_gradient(aux["router_load"])
        return loss, (nll, count, stats)

    def _target_logprobs(self, params, rest, batch):
        """(log p(target) [B, S], logsumexp [B, S], aux) under `params`; the head runs in
        `vocab_tiling_chunks` sequence chunks (vocab_tiling.py), traced under the run's mesh."""
        model = nnx.merge(self.graphdef, params, rest)
        cfg = self.cfg
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            x, _, aux = model.hidden(
                batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
            )
            logp, log_z = target_logprobs(model, x, batch["targets"], cfg.vocab_tiling_chunks)
            if cfg.mtp_num_layers and cfg.objective == "lm":
                loads: dict = {}
                depths = model.mtp_hidden(
                    x, batch["inputs"], batch["positions"], batch["segment_ids"], loads
                )
                if loads and "router_load" in aux:  # the MTP modules' router biases move too
                    aux["router_load"] = {**aux["router_load"], **loads}
                aux["mtp_logps"] = [
                    target_logprobs(
                        model, h, shift_left(batch["targets"], k + 1), cfg.vocab_tiling_chunks,
                        logits_fn=partial(model.mtp_logits, k),
                    )[0]
                    for k, h in enumerate(depths)
                ]  # fmt: skip
        return logp, log_z, aux

    def token_logps(self, params, rest, batch):
        """log p(target) per token [B, S] (float32) under `params`."""
        return self._target_logprobs(params, rest, batch)[0]

    def _grpo_loss(self, params, rest, batch):
        """(summed GRPO / GSPO loss, (summed loss, completion count, summed statistics))."""
        cfg = self.cfg
        logp = self.token_logps(params, rest, batch)
        ref = batch["ref_logps"] if cfg.grpo_beta else jax.lax.stop_gradient(logp)
        total, stats = policy_loss(
            logp,
            batch["old_logps"],
            ref,
            batch["advantages"],
            batch["weights"],
            algo=cfg.grpo_loss_algo,
            eps=cfg.grpo_epsilon,
            eps_high=cfg.grpo_epsilon_high,
            beta=cfg.grpo_beta,
            kl_estimator=cfg.grpo_kl_estimator,
        )
        return total, (total, jnp.asarray(logp.shape[0], jnp.float32), stats)

    def _dpo_loss(self, params, rest, batch, ref):
        """(summed DPO loss, (summed loss, pair count, summed DPO statistics)); see dpo.py."""
        cfg = self.cfg

        def logps(p):
            logp = self.token_logps(p, rest, batch) * batch["weights"]
            return jnp.sum(logp, axis=-1), jnp.sum(batch["weights"], axis=-1)

        policy, lengths = logps(params)
        reference, _ = logps(jax.lax.stop_gradient(self._reference(params, ref)))
        losses, stats = dpo_loss(
            policy,
            jax.lax.stop_gradient(reference),
            lengths,
            beta=cfg.dpo_beta,
            label_smoothing=cfg.dpo_label_smoothing,
            kind=cfg.dpo_loss,
        )
        total = jnp.sum(losses)
        return total, (total, jnp.asarray(losses.shape[0], jnp.float32), stats)

    def _grads(self, params, rest, batch, ref=None, dropout_key=None):
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        accum = self.cfg.grad_accum_steps
        if accum == 1:
            (_, (nll, count, stats)), grads = grad_fn(params, rest, batch, ref, dropout_key)
            return grads, nll, count, stats

        # DPO keeps each (chosen, rejected) pair of rows in one microbatch; GRPO rows carry their
        # own advantages, so any split of rows works.
        rows_together = 2 if self.cfg.objective == "dpo" else 1
        spec = self.batch_sharding.spec

        def to_micro(x):  # [B, ...] -> [accum, B / accum, ...]: row group r -> microbatch r % accum
            g = rows_together
            x = x.reshape(x.shape[0] // (accum * g), accum, g, *x.shape[1:])
            x = jnp.swapaxes(x, 0, 1).reshape(accum, -1, *x.shape[3:])
            micro_spec = jax.sharding.PartitionSpec(None, *spec[: x.ndim - 1])
            return jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(self.mesh, micro_spec)
            )

        micro = {k: to_micro(v) for k, v in batch.items()}
        zeros = jax.tree.map(jnp.zeros_like, params)
        stats_shape = jax.eval_shape(
            lambda: self._loss(params, rest, jax.tree.map(lambda a: a[0], micro), ref)[1][2]
        )

        def body(carry, xs):
            mb, i = xs
            g_acc, nll_acc, n_acc, s_acc = carry
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            (_, (nll, count, stats)), g = grad_fn(params, rest, mb, ref, key)
            s_acc = jax.tree.map(jnp.add, s_acc, stats)
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + count, s_acc), None

        init = (
            zeros,
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), stats_shape),
        )
        (grads, nll, count, stats), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
        return grads, nll, count, stats

    def _train_step(self, state, batch):
        params = state["params"]
        dropout_key = None
        if self.cfg.lora_rank > 0 and self.cfg.lora_dropout > 0:  # a fresh mask every step
            base_key = jax.random.wrap_key_data(state["rng"])
            dropout_key = jax.random.fold_in(base_key, state["step"])
        grads, nll, count, stats = self._grads(
            params, state["rest"], batch, state.get("ref_params"), dropout_key
        )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_state = dict(
            state,
            params=optax.apply_updates(params, updates),
            opt_state=opt_state,
            step=state["step"] + 1,
        )
        loads = stats.pop("router_load", None)
        if loads is not None:  # aux-loss-free balancing (router_bias_update_rate > 0)
            rate = self.cfg.router_bias_update_rate
            new_state["rest"] = update_router_bias(state["rest"], loads, rate)
        tokens = jnp.sum(batch["weights"]) if self.cfg.objective != "lm" else count
        metrics = {"loss": nll / denom, "grad_norm": grad_norm, "tokens": tokens}
        metrics.update(finish_moe_statistics(stats, denom))
        return new_state, metrics

    def _eval_step(self, state, batch):
        _, (nll, count, stats) = self._loss(
            state["params"], state["rest"], batch, state.get("ref_params")
        )
        stats.pop("router_load", None)
        return {"nll": nll, "tokens": count, **stats}
