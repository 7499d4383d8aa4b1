"""`diffquant` command line: thin wrappers over the public Python API."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from diffquant.demo import run_demo

    print(run_demo(args.quantization, ignored_layers=args.ignored_layers, seed=args.seed, verbose=args.verbose))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffquant", description="Quantized diffusion-model inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a tiny FLUX transformer and report what changed")
    demo.add_argument("--quantization", "-q", default="fp8", help="method name, e.g. fp8 or int8")
    demo.add_argument("--ignored-layers", default="", help="comma-separated layer patterns kept in bf16")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--verbose", "-v", action="store_true", help="print the per-layer table")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"diffquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
