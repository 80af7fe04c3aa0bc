"""`llm-train`: train, export, plan and compile from a config file plus key=value overrides."""

from __future__ import annotations

import argparse
import os
import sys

from llm_train.host_memory import HUGE_PAGES_MIN_STEPS, rerun_with_huge_pages
from llm_train.start_up import pause_gc, resume_gc

EPILOG = """examples:
  llm-train train pretrain.yml model_name=llama3.2-1b dataset_kind=text \\
      dataset_path='data/**/*.txt' tokenizer_path=tok.json run_name=exp1
  llm-train train bench-small steps=20 run_name=smoke          # synthetic data
  llm-train train bench-small steps=20 run_name=smoke          # again: resumes from step 20's checkpoint
  llm-train export bench-small run_name=smoke --out exported/   # parameter-only checkpoint
                                      # (LoRA runs: merged; --peft-adapter: the adapter alone)
  llm-train train sft.yml model_name=llama3.2-1b init_from=hf/Llama-3.2-1B-Instruct \
      tokenizer_path=hf/Llama-3.2-1B-Instruct dataset_path=chat.jsonl run_name=sft1
                                      # fine-tune on chat / prompt-completion records
  llm-train train dpo.yml model_name=llama3.2-1b init_from=runs/sft1/export \
      tokenizer_path=hf/Llama-3.2-1B-Instruct dataset_path=pairs.jsonl run_name=dpo1
  llm-train train rl.yml model_name=llama3.2-1b init_from=runs/sft1/export \
      tokenizer_path=hf/Llama-3.2-1B-Instruct dataset_path=math.jsonl run_name=grpo1 \
      'reward_functions=[llm_train.rewards:exact_match_number]'   # GRPO, in-process rollouts
  llm-train plan bench-small ici_fsdp_parallelism=8              # memory / FLOPs estimate
  llm-train compile bench-small --devices 8 ici_fsdp_parallelism=8   # 8 simulated CPU devices
  llm-train plan bench-small --devices 8 ici_stage_parallelism=2 ici_fsdp_parallelism=4 \
      global_batch_size=16 num_pipeline_microbatches=4   # pipeline stages: memory, bubble

Output goes to <base_output_dir>/<run_name>/: checkpoints/, metrics.jsonl, tensorboard/, config.yml.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-train",
        description="Pre-train and post-train (SFT, DPO, GRPO/GSPO, LoRA) LLMs in JAX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train (or resume) a run",
        "export": "write a parameter-only checkpoint of a run",
        "plan": "per-device memory and FLOPs estimate, without compiling",
        "compile": "ahead-of-time compile the train step; report time and memory",
    }
    for name, text in helps.items():
        s = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("config", help="a YAML file or a shipped config name (e.g. bench-small)")
        s.add_argument("overrides", nargs="*", help="key=value overrides")
        if name in ("plan", "compile"):
            s.add_argument(
                "--devices",
                type=int,
                default=0,
                help="simulate N CPU devices (sets XLA_FLAGS before JAX starts)",
            )
        if name == "export":
            s.add_argument("--out", required=True, help="output folder")
            s.add_argument(
                "--step", type=int, default=None, help="checkpoint step (default: latest)"
            )
            s.add_argument(
                "--peft-adapter",
                action="store_true",
                help="LoRA runs: write the adapter alone as a PEFT folder (adapter_model."
                "safetensors + adapter_config.json; needs llm-convert) instead of merged weights",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    pause_gc()  # until the first train step is done (llm_train.start_up)
    try:
        return _main(argv)
    finally:
        resume_gc()


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if "=" not in x or x.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]  # key=value after an option
    if getattr(args, "devices", 0):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    from llm_core import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if argv is None and args.command == "train" and cfg.steps >= HUGE_PAGES_MIN_STEPS:
            rerun_with_huge_pages("llm_train.cli", sys.argv[1:])  # see llm_train.host_memory
        if args.command == "train":
            from llm_train.trainer import TrainingDiverged, train

            try:
                result = train(cfg)
            except TrainingDiverged as err:
                print(f"error: {err}", file=sys.stderr)
                return 3
            last = result.losses.get(result.last_step)
            print(
                f"done: steps {result.first_step}->{result.last_step}"
                + (f", loss {last:.4f}" if last is not None else "")
                + f", output in {result.out_dir}"
            )
        elif args.command == "export":
            from llm_train.export import export

            if args.peft_adapter:
                from llm_train.export import export_peft_adapter

                path = export_peft_adapter(cfg, args.out, args.step)
                print(f"exported the LoRA adapter to {path} (load with peft.PeftModel)")
            else:
                path = export(cfg, args.out, args.step)
                print(f"exported parameters to {path} (load with llm_core.load)")
        elif args.command == "plan":
            from llm_train.plan import plan, plan_table

            print(plan_table(plan(cfg)))
        elif args.command == "compile":
            from llm_train.plan import compile_report

            print(compile_report(cfg))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
