"""`llm-convert`: Hugging Face <-> native checkpoints, and logit verification."""

from __future__ import annotations

import argparse
import sys
import time

from llm_convert.errors import ConversionError

EXAMPLES = """examples:
  llm-convert hf-to-native ./Llama-3.2-1B ./llama3.2-1b-native            # float32 (default)
  llm-convert hf-to-native ./gemma-2-2b ./gemma2-native --dtype bfloat16
  llm-convert native-to-hf ./llama3.2-1b-native ./exported-hf --max-shard-gb 2
  llm-convert verify ./Llama-3.2-1B ./llama3.2-1b-native --max-logit-diff 1e-3
  llm-convert quantize ./llama3.2-1b-native ./llama3.2-1b-int8 --mode int8   # serve with llm-serve
  llm-convert quantize ./llama3.2-1b-native ./llama3.2-1b-int4 --mode int4 --group-size 128
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="llm-convert",
        description="Convert checkpoints between Hugging Face and native formats.",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_native = sub.add_parser(
        "hf-to-native", help="HF folder -> native checkpoint", epilog=EXAMPLES, formatter_class=fmt
    )
    to_native.add_argument("src", help="Hugging Face model folder (config.json + *.safetensors)")
    to_native.add_argument(
        "dst", help="output folder (config.yml + tensors/, written one tensor at a time)"
    )
    to_native.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_hf = sub.add_parser(
        "native-to-hf", help="native checkpoint -> HF folder", epilog=EXAMPLES, formatter_class=fmt
    )
    to_hf.add_argument("src", help="native checkpoint folder")
    to_hf.add_argument("dst", help="output Hugging Face folder")
    to_hf.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype to write (default: the checkpoint's weight_dtype)",
    )
    to_hf.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split safetensors past this size"
    )
    quant = sub.add_parser(
        "quantize",
        help="native checkpoint -> weight-only int8 / int4 native checkpoint (for llm-serve)",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    quant.add_argument("src", help="float native checkpoint folder")
    quant.add_argument("dst", help="output native checkpoint folder")
    quant.add_argument(
        "--mode",
        default="int8",
        help="int8 (per-output-channel scales) or int4 (grouped scales, two values per byte)",
    )
    quant.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="int4: inputs per scale (even, dividing every Linear's input size; default 128)",
    )
    check = sub.add_parser(
        "verify",
        help="compare logits of HF and native models (needs torch)",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    check.add_argument("hf_dir")
    check.add_argument("native_dir")
    check.add_argument("--prompts", type=int, default=4)
    check.add_argument("--seq-len", type=int, default=32)
    check.add_argument("--max-logit-diff", type=float, default=1e-3)
    check.add_argument("--max-kl", type=float, default=1e-5)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm_convert.api import hf_to_native, native_to_hf, quantize_native
    from llm_convert.verify import verify

    start = time.perf_counter()
    try:
        if args.command == "hf-to-native":
            out = hf_to_native(args.src, args.dst, args.dtype)
            print(f"wrote native checkpoint {out} in {time.perf_counter() - start:.1f}s")
        elif args.command == "quantize":
            out = quantize_native(args.src, args.dst, args.mode, args.group_size)
            print(
                f"wrote {args.mode} native checkpoint {out} in {time.perf_counter() - start:.1f}s"
            )
        elif args.command == "native-to-hf":
            out = native_to_hf(args.src, args.dst, args.dtype, int(args.max_shard_gb * 1024**3))
            print(f"wrote Hugging Face folder {out} in {time.perf_counter() - start:.1f}s")
        else:
            report = verify(args.hf_dir, args.native_dir, args.prompts, args.seq_len)
            ok = report.ok(args.max_logit_diff, args.max_kl)
            print(
                f"max |logit diff| = {report.max_abs_logit_diff:.3e}   mean KL/token = "
                f"{report.mean_kl_per_token:.3e}   over {report.tokens} tokens   "
                f"{'OK' if ok else 'FAIL (over --max-logit-diff / --max-kl)'}"
            )
            return 0 if ok else 1
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # llm-core checkpoint errors and the like
        from llm_core.io import CheckpointError

        if isinstance(err, CheckpointError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
