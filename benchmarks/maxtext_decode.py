"""MaxText's decoding throughput on the bench model (CPU, float32, random weights, greedy): the
baseline `benchmarks/serve.py --maxtext-python PYTHON` runs in a venv with MaxText
(benchmarks/maxtext_venv.sh).

Uses MaxText's inference engine (`maxengine.MaxEngine`) the way MaxText's own decode.py does:
load_params (no checkpoint: random init), then per request prefill -> insert into slot i, then
`generate` steps for all B slots at once, blocking on each step's tokens as a server would. Same
shapes as configs/bench-small.yml. One untimed pass compiles everything; the timed pass follows.

Prints `RESULT {"ttft_s" (pass start to request 0's first token), "total_s" (the whole pass:
B prompts prefilled, NEW tokens each), "step_s" (median generate step)}`.

    JAX_PLATFORMS=cpu PYTHON benchmarks/maxtext_decode.py B [NEW=128] [PROMPT=32]
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")  # no JetStream/GCS: MaxText stubs them
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# MaxText prints to stdout: keep stdout for the RESULT line
STDOUT, sys.stdout = sys.stdout, sys.stderr

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import struct  # noqa: E402
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.inference.maxengine import maxengine  # noqa: E402
from maxtext_model import BENCH_SMALL  # noqa: E402


@struct.dataclass
class ResultTokens:
    """Field-for-field copy of JetStream's engine_api.ResultTokens (commit 29329e8, the one MaxText
    pins). Without JetStream (which needs seqio/TensorFlow), MaxText substitutes a plain-class stub
    that is not a JAX pytree, so its jitted prefill/generate fail; this dataclass is what they return."""

    data: jax.Array
    tokens_idx: tuple = struct.field(pytree_node=False)
    valid_idx: tuple = struct.field(pytree_node=False)
    length_idx: tuple = struct.field(pytree_node=False)
    samples_per_slot: int = struct.field(pytree_node=False)
    log_prob: jax.Array = None


if getattr(maxengine.engine_api, "_IS_STUB", False):
    maxengine.engine_api.ResultTokens = ResultTokens


def make_config(batch: int, prompt: int, target: int):
    base_yml = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
    overrides = dict(
        **BENCH_SMALL,
        run_name="bench_decode",
        base_output_directory=tempfile.mkdtemp(prefix="maxtext_decode_"),
        per_device_batch_size=batch,
        max_prefill_predict_length=prompt,
        max_target_length=target,
        decode_sampling_strategy="greedy",
    )
    return pyconfig.initialize(["decode.py", base_yml] + [f"{k}={v}" for k, v in overrides.items()])


def run_pass(engine, params, prompts, gen_steps: int):
    """prefill+insert every prompt, then gen_steps generate calls; returns (wall, ttft, step times)."""
    t0 = time.perf_counter()
    ttft = None
    decode_state = engine.init_decode_state()
    for slot, tokens in enumerate(prompts):
        prefix, first = engine.prefill(
            params=params, padded_tokens=tokens, true_length=len(tokens), slot=slot
        )
        if ttft is None:
            jax.block_until_ready(first.data)
            ttft = time.perf_counter() - t0
        decode_state = engine.insert(prefix, decode_state, slot=slot)
    jax.block_until_ready(decode_state)
    steps = []
    for _ in range(gen_steps):
        s = time.perf_counter()
        decode_state, result = engine.generate(params, decode_state)
        jax.block_until_ready(result.data)
        steps.append(time.perf_counter() - s)
    return time.perf_counter() - t0, ttft, steps


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    target = -(-(prompt + new_tokens) // 16) * 16
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # as MaxText's decode.py does
    engine = maxengine.MaxEngine(make_config(batch, prompt, target))
    params = engine.load_params(rng=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [
        jax.numpy.asarray(rng.integers(1, 32000, prompt), dtype=jax.numpy.int32)
        for _ in range(batch)
    ]
    run_pass(engine, params, prompts, new_tokens - 1)  # compiles prefill / insert / generate
    total, ttft, steps = run_pass(engine, params, prompts, new_tokens - 1)
    result = {"ttft_s": ttft, "total_s": total, "step_s": statistics.median(steps)}
    print("RESULT " + json.dumps(result), file=STDOUT, flush=True)


if __name__ == "__main__":
    main()
