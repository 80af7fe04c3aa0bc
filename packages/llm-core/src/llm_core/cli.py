"""`llm-core` command line: inspect resolved configurations."""

from __future__ import annotations

import argparse
import sys

import yaml

from llm_core.config import ConfigError, load_config, shipped_model_names
from llm_core.models import layer_placement
from llm_core.models.counting import count_params

EXAMPLES = """examples:
  llm-core config show llama3-8b                      # a shipped model on the base defaults
  llm-core config show sft.yml model_name=qwen3-0.6b  # task file + model + overrides
  llm-core config show my_run.yml num_layers=2 dtype=bfloat16
  llm-core config models                              # list shipped model configs
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-core",
        description="Inspect llm-core configurations.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser(
        "config",
        help="configuration tools",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved config as YAML",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("config", help="a YAML file, a shipped task file (sft.yml) or a model name")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, applied last")
    config_sub.add_parser("models", help="list the shipped model configs")
    return parser


def _kind(kind) -> str:
    return f"{kind.attention}{'-local' if kind.local else ''}/{kind.ffn}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "models":
        print("\n".join(shipped_model_names()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    derived = {
        "resolved_head_dim": cfg.resolved_head_dim,
        "resolved_num_kv_heads": cfg.resolved_num_kv_heads,
        "layer_attention_kinds": list(cfg.layer_attention_kinds),
        "layer_segments": [
            f"{seg.name}: {seg.repeats} x [{', '.join(_kind(k) for k in seg.kinds)}]"
            for seg in layer_placement(cfg).segments
        ],
        "parameters": count_params(cfg),
    }
    if cfg.ffn_kind == "moe":
        derived["active_parameters"] = count_params(cfg, active=True)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print("# derived")
    print(yaml.safe_dump(derived, sort_keys=False, default_flow_style=None), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
