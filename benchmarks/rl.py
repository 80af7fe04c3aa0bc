"""GRPO step breakdown of llm-train on the bench model: rollout (llm-serve's engine, in process),
log-probs of the sampling policy, policy update; rollout tokens/s.

Model: configs/bench-small.yml (d_model 512, 8 layers, vocab 32000, float32); 8 prompts x 4
generations per round, completions of up to 64 tokens at temperature 1, a regex reward; a byte-level
BPE tokenizer (1000 tokens) trained here on the prompts. Rounds after the first (which compiles)
are reported as medians, with the CPU model and the load average before and after.

    python benchmarks/rl.py [--rounds 4] [key=value ...]   # e.g. packed_matmul=false
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from kernels import cpu_model, load_average  # benchmarks/kernels.py: one definition of each


def _tokenizer(folder: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts * 4))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(corpus)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="GRPO rounds; the first is warm-up")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    from llm_core import load_config
    from llm_train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = [f"Question {i}: what is {i % 13} times {i % 7}? Answer:" for i in range(64)]
        tok = _tokenizer(folder, prompts)
        data = folder / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
        cfg = load_config(
            "bench-small",
            [
                "objective=grpo", "dataset_format=prompts", "dataset_kind=jsonl",
                f"dataset_path={data}", f"tokenizer_path={tok}",
                "reward_functions=[llm_train.rewards:format_regex]", r"reward_format_regex=\d",
                "num_generations=4", "global_batch_size=32", "max_completion_length=64",
                "max_decode_slots=32", f"steps={args.rounds}", "warmup_steps=0",
                "learning_rate=1e-6", f"base_output_dir={folder}", "run_name=rl",
                "console_progress=false", "tensorboard=false", "compilation_cache_dir=",
                *args.overrides,
            ],
        )  # fmt: skip
        result = train(cfg)
        with open(os.path.join(result.out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(x) for x in f]
    timed = [r for r in rows if "time_rollout" in r][1:]  # drop the compiling round
    if not timed:
        raise SystemExit("need --rounds >= 2")

    def med(key):
        return statistics.median(r[key] for r in timed)

    total = med("time_rollout") + med("time_logps") + med("time_update")
    print(f"rounds timed: {len(timed)} (median), 8 prompts x 4 generations, <= 64 new tokens")
    for key in ("time_rollout", "time_logps", "time_update"):
        print(f"{key:<14} {med(key):7.2f} s  {100 * med(key) / total:5.1f}%")
    print(f"rollout tokens/s: {med('rollout_tokens_per_sec'):,.0f} "
          f"(mean completion length {med('completion_length'):.1f})")  # fmt: skip
    print(f"update tokens/s (completion tokens trained): {med('train_tokens_per_sec'):,.0f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
