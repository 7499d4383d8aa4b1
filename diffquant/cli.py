"""`diffquant` command line: thin wrappers over the public Python API."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


class _Parser(argparse.ArgumentParser):
    """Usage errors print one line, like every other diffquant error."""

    def error(self, message: str):
        self.exit(2, f"diffquant: error: {message}\n")


def _quiet_libraries() -> None:
    """diffusers / transformers chatter (loading bars, optional-dependency notes) off for the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = lambda msg, *a, **k: print(f"diffquant: warning: {msg}", file=sys.stderr)


def _no_loading_bars() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _cmd_demo(args: argparse.Namespace) -> int:
    from diffquant.demo import run_demo

    print(run_demo(args.quantization, ignored_layers=args.ignored_layers, seed=args.seed, verbose=args.verbose))
    return 0


def _load_json_arg(value: str | None) -> Any:
    """--quantization-config: inline JSON, or a path to a JSON file."""
    if value is None:
        return None
    text = value if value.lstrip().startswith(("{", "[", '"')) else None
    if text is None:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--quantization-config: {value!r} is neither JSON nor an existing file")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--quantization-config is not valid JSON: {e}") from None


def quant_args(quantization: str | None, ignored_layers: str | None, config: Any) -> tuple[Any, Any]:
    """(quantization, quantization_config) for Engine from the CLI flags."""
    ignored = [p.strip() for p in (ignored_layers or "").split(",") if p.strip()]
    if not ignored:
        return quantization, config
    if config is None:
        if quantization is None:
            raise ValueError("--ignored-layers needs --quantization (or a --quantization-config with a method)")
        return quantization, {"ignored_layers": ignored}
    if not isinstance(config, dict) or not ({"method", "quant_method"} & set(config)):
        raise ValueError("--ignored-layers combines only with a single-method --quantization-config; "
                         "put ignored_layers inside the per-component entry instead")
    return quantization, {**config, "ignored_layers": [*config.get("ignored_layers", []), *ignored]}


def _cmd_generate(args: argparse.Namespace) -> int:
    from diffquant.engine import Engine, SamplingParams
    from diffquant.engine.loading import read_pipeline_info
    from diffquant.engine.output import generation_summary

    prompt = args.prompt_opt if args.prompt_opt is not None else args.prompt
    if not prompt:
        raise ValueError("a prompt is required: diffquant generate \"a red circle\" --model DIR")
    quantization, config = quant_args(args.quantization, args.ignored_layers, _load_json_arg(args.quantization_config))
    read_pipeline_info(args.model, warn=False)  # folder errors before the slow diffusers import
    _no_loading_bars()
    start = time.perf_counter()
    engine = Engine(model=args.model, quantization=quantization, quantization_config=config,
                    device=args.device, compile=args.compile, attention_quantization=args.attention_quantization)
    for hint in engine.hints():
        print(f"diffquant: note: {hint}", file=sys.stderr)
    params = SamplingParams(num_inference_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg,
                            height=args.height, width=args.width, num_frames=args.frames, seed=args.seed,
                            negative_prompt=args.negative_prompt, num_outputs_per_prompt=args.num_outputs)
    out = engine.generate(prompt, params, progress=not args.quiet)
    output = args.output or ("output.gif" if out.frames is not None else "output.png")
    saved = out.save(output)
    line = generation_summary(engine.reports, out, time.perf_counter() - start, saved)
    for name, patch in engine.attention.items():  # FP8 attention: how many attention calls took it
        line += f"; FP8 attention in {name}: {patch.fp8_calls} of {patch.fp8_calls + patch.kept_calls} calls"
    print(line)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from diffquant.quantization.tools.compare_diffusion_trajectory_similarity import run_compare

    _no_loading_bars()
    return run_compare(args)


def _add_compare(sub) -> None:
    from diffquant.quantization.tools.compare_diffusion_trajectory_similarity import add_compare_arguments

    cmp = sub.add_parser("compare", help="compare a reference and a quantized candidate run (quality, trajectory, "
                                         "speed, memory, layer sensitivity)")
    add_compare_arguments(cmp)
    cmp.set_defaults(func=_cmd_compare)


def _cmd_info(args: argparse.Namespace) -> int:
    from diffquant.engine.info import info_text

    print(info_text(args.model))
    return 0


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate an image or video with a (quantized) diffusers pipeline")
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", dest="prompt_opt", help="the prompt")
    gen.add_argument("--model", help="diffusers pipeline folder (model_index.json)")
    gen.add_argument("--quantization", "-q", help="method for the diffusion transformer(s): fp8, int8, ...")
    gen.add_argument("--ignored-layers", help="comma-separated layer patterns kept in bf16, e.g. img_mlp")
    gen.add_argument("--quantization-config", help="JSON (or a JSON file): method params or per-component dict")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--frames", type=int, help="frames (video models)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--guidance", type=float, help="guidance_scale")
    gen.add_argument("--true-cfg", type=float, help="true_cfg_scale (Qwen-Image, FLUX true CFG)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--num-outputs", type=int, default=1, help="outputs per prompt")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    gen.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                     help="torch.compile the diffusion transformer(s); MODE is a torch.compile mode: "
                          "default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs")
    gen.add_argument("--attention-quantization", metavar="METHOD",
                     help="fp8: FP8 self-attention in the diffusion transformer(s) (prototype)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("-o", "--output", help="output file (.png; .gif/.webp animate videos)")
    gen.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffquant", description="Quantized diffusion-model inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a tiny FLUX transformer and report what changed")
    demo.add_argument("--quantization", "-q", default="fp8", help="method name, e.g. fp8 or int8")
    demo.add_argument("--ignored-layers", default="", help="comma-separated layer patterns kept in bf16")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--verbose", "-v", action="store_true", help="print the per-layer table")
    demo.set_defaults(func=_cmd_demo)
    _add_generate(sub)
    _add_compare(sub)
    info = sub.add_parser("info", help="components, architecture profile and weight sizes of a pipeline folder")
    info.add_argument("model", help="diffusers pipeline folder")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "info", "compare"):
        _quiet_libraries()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"diffquant: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `diffquant` command: main(), then exit without tearing the interpreter down. Unloading
    torch, diffusers and transformers module by module took 1.5-2 s of a 10 s CLI run on a 2-core
    machine; atexit handlers still run and both streams are flushed first."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
