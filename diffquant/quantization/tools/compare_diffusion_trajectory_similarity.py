"""Compare a reference diffusion run with a (quantized) candidate run: same prompt, seed, resolution,
scheduler and steps. Reports output similarity (PSNR, SSIM, cosine, MAE, ... on the decoded uint8
outputs), the per-step latent trajectory (both runs start from the same noise and step in
lockstep), generation time, peak memory and weight bytes, and optionally the layer sensitivity.

    python -m diffquant.quantization.tools.compare_diffusion_trajectory_similarity \\
        --candidate-quantization fp8 --output-json /tmp/cmp.json      # embedded model, bf16 vs fp8
    diffquant compare ...                                              # the same command

`compare_diffusion_trajectory_similarity()` is the Python entry point; the CLI is a thin wrapper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from diffquant.quantization.tools.metrics import (
    METRIC_NAMES,
    json_safe,
    output_metrics,
    threshold_table,
    video_metrics,
)
from diffquant.quantization.tools.runs import VariantSpec, load_engine, release, run_variant, sampling_record
from diffquant.quantization.tools.sensitivity import GROUP_KINDS, layer_sensitivity
from diffquant.quantization.tools.trajectory import DRIFT_LEVEL, compare_trajectories, first_drift_step, same_start

TASKS = ("t2i", "t2v")


def _check_options(task: str, warmup_runs: int, measure_runs: int, params) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if warmup_runs < 0 or measure_runs < 1:
        raise ValueError(f"warmup_runs must be >= 0 and measure_runs >= 1, got {warmup_runs} / {measure_runs}")
    if params.seed is None:
        raise ValueError("a seed is required: both runs must start from the same noise")


def sensitivity_config(reference: VariantSpec, candidate: VariantSpec):
    """The single-method config that sensitivity applies group by group (checked before any load)."""
    from diffquant.engine.loading import resolve_quant_spec
    from diffquant.quantization import QuantizationConfig

    if reference.quantization is not None or reference.quantization_config is not None:
        raise ValueError("--sensitivity needs a bf16 reference (no --reference-quantization)")
    if reference.model != candidate.model:
        raise ValueError("--sensitivity quantizes the reference model online; --candidate-model must be the same model")
    cfg = resolve_quant_spec(candidate.quantization, candidate.quantization_config)
    if not isinstance(cfg, QuantizationConfig):
        raise ValueError("--sensitivity needs a single-method candidate quantization (e.g. --candidate-quantization "
                         "fp8), not a per-component config or none")
    return cfg


def compare_diffusion_trajectory_similarity(
    reference: VariantSpec, candidate: VariantSpec, prompt: str, params, *, task: str = "t2i",
    warmup_runs: int = 0, measure_runs: int = 1, save_output_dir: str | Path | None = None,
    device: str | None = None, compile: bool = False, drift_level: float = DRIFT_LEVEL,
    sensitivity: bool = False, target_psnr: float | None = None, sensitivity_groups: tuple[str, ...] = GROUP_KINDS,
    log=None,
) -> dict[str, Any]:
    """Run reference then candidate with the same SamplingParams (seed required); the JSON-ready result."""
    _check_options(task, warmup_runs, measure_runs, params)
    sens_cfg = sensitivity_config(reference, candidate) if sensitivity else None
    log = log or (lambda msg: None)
    log(f"reference ({reference.quantization or 'bf16'}): {warmup_runs} warm-up + {measure_runs} measured runs")
    ref_engine = load_engine(reference, device, compile)
    ref = run_variant(ref_engine, prompt, params, task, warmup_runs, measure_runs)
    sampling = sampling_record(ref_engine, prompt, params)
    if not sensitivity:
        release(ref_engine)
    what = (candidate.quantization or "bf16") + (", FP8 attention" if candidate.attention_quantization else "")
    log(f"candidate ({what}): {warmup_runs} warm-up + {measure_runs} measured runs")
    cand_engine = load_engine(candidate, device, compile)
    cand = run_variant(cand_engine, prompt, params, task, warmup_runs, measure_runs)
    release(cand_engine)
    result = _result(reference, candidate, ref, cand, task, sampling, drift_level)
    if save_output_dir is not None:
        from diffquant.quantization.tools.images import save_outputs

        result["saved_outputs"] = save_outputs(save_output_dir, ref.last, cand.last, ref.output, cand.output, task)
    if sens_cfg is not None:
        result["sensitivity"] = layer_sensitivity(ref_engine, sens_cfg, ref.output, prompt, params, task, target_psnr,
                                                  sensitivity_groups, log)
        release(ref_engine)
    return json_safe(result)


def _result(reference, candidate, ref, cand, task, sampling, drift_level) -> dict[str, Any]:
    metrics = video_metrics(ref.output, cand.output) if task == "t2v" else output_metrics(ref.output, cand.output)
    rows = compare_trajectories(ref.latents, cand.latents)
    return {
        "task": task,
        "reference": reference.describe(),
        "candidate": candidate.describe(),
        "sampling": sampling,
        "output_shape": list(ref.output.shape),
        "output_metrics": metrics,
        "thresholds": threshold_table(gate_metrics(metrics)),
        "trajectory": {"same_initial_noise": same_start(ref.initial_latents, cand.initial_latents),
                       "drift_level_relative_l2": drift_level, "first_drift_step": first_drift_step(rows, drift_level),
                       "steps": rows},
        "reference_generation": ref.generation,
        "candidate_generation": cand.generation,
    }


def gate_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The flat metric dict gates and thresholds read: the image's, or all frames' for video."""
    return metrics.get("all_frames", metrics)


# ---- gates --------------------------------------------------------------------------------------
def parse_gate(text: str | None, flag: str) -> dict[str, float]:
    """'psnr_db=25,cosine_similarity=0.995' -> {name: value}; unknown names are a ValueError."""
    out: dict[str, float] = {}
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in METRIC_NAMES:
            raise ValueError(f"{flag}: {item!r} is not METRIC=VALUE with METRIC one of {', '.join(METRIC_NAMES)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: {value.strip()!r} is not a number (in {item!r})") from None
    return out


def check_gates(metrics: dict[str, Any], below: dict[str, float], above: dict[str, float]) -> list[str]:
    """Failures as 'psnr_db 22.10 < 25' lines. A None PSNR (identical outputs) never fails."""
    failures = []
    for name, floor in below.items():
        value = metrics.get(name)
        if value is not None and value < floor:
            failures.append(f"{name} {value:.6g} < {floor:g}")
    for name, ceiling in above.items():
        value = metrics.get(name)
        if value is None and name != "psnr_db":
            continue
        if value is None or value > ceiling:
            failures.append(f"{name} {'inf' if value is None else f'{value:.6g}'} > {ceiling:g}")
    return failures


# ---- command line ---------------------------------------------------------------------------------
def json_arg(value: str | None, flag: str) -> Any:
    """Inline JSON, or the path of a JSON file."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith(("{", "[", '"')):
        if not Path(value).is_file():
            raise ValueError(f"{flag}: {value!r} is neither JSON nor an existing file")
        text = Path(value).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON: {e}") from None


def with_ignored(quantization: str | None, config: Any, ignored: list[str]) -> Any:
    """Fold --ignored-layers into the candidate's quantization config."""
    if not ignored:
        return config
    if config is None:
        if quantization is None:
            raise ValueError("--ignored-layers needs --candidate-quantization (or a config JSON with a method)")
        return {"ignored_layers": ignored}
    if not isinstance(config, dict) or not ({"method", "quant_method"} & set(config) or quantization):
        raise ValueError("--ignored-layers combines only with a single-method candidate config")
    return {**config, "ignored_layers": [*config.get("ignored_layers", []), *ignored]}


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--task", choices=TASKS, default="t2i", help="t2i (images) or t2v (videos)")
    a("--model", help="diffusers pipeline folder for both runs (default: the embedded tiny model)")
    a("--reference-model", help="reference pipeline folder (default: --model)")
    a("--candidate-model", help="candidate pipeline folder, e.g. a pre-quantized checkpoint (default: --model)")
    a("--reference-quantization", help="method for the reference (default: none, bf16)")
    a("--candidate-quantization", help="method for the candidate: fp8, int8, ...")
    a("--reference-quantization-config-json", help="reference config: inline JSON or a JSON file")
    a("--candidate-quantization-config-json", help="candidate config: inline JSON or a JSON file")
    a("--ignored-layers", help="comma-separated layer patterns kept in bf16 in the candidate")
    a("--candidate-attention-quantization", metavar="METHOD", help="fp8: the candidate's self-attention in FP8")
    a("--prompt", default="a small red circle at the top on a white background")
    a("--negative-prompt")
    a("--height", type=int)
    a("--width", type=int)
    a("--num-frames", type=int)
    a("--num-inference-steps", type=int)
    a("--guidance-scale", type=float)
    a("--seed", type=int, default=0)
    a("--warmup-runs", type=int, default=0, help="untimed runs before measuring (default 0)")
    a("--measure-runs", type=int, default=1, help="timed runs per variant (default 1)")
    a("--output-json", required=True, help="where to write the result JSON")
    a("--save-output-dir", help="save reference / candidate outputs and a side-by-side PNG here")
    a("--enforce-eager", action="store_true", help="no torch.compile (the default; accepted for compatibility)")
    a("--compile", action="store_true", help="torch.compile the diffusion transformer(s) of both runs")
    a("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    a("--drift-level", type=float, default=DRIFT_LEVEL, help="latent relative_l2 reported as drift (default 0.05)")
    a("--sensitivity", action="store_true", help="rank layer groups by the error each causes quantized alone")
    a("--sensitivity-groups", choices=("all", *GROUP_KINDS), default="all", help="name groups, block groups, or both")
    a("--target-psnr", type=float, help="with --sensitivity: grow ignored_layers until the candidate reaches it")
    a("--fail-below", help="exit 1 if a metric is below, e.g. psnr_db=25,cosine_similarity=0.995")
    a("--fail-above", help="exit 1 if a metric is above, e.g. mae=6")


def _specs(args: argparse.Namespace) -> tuple[VariantSpec, VariantSpec]:
    from diffquant.quantization.attention import check_attention_method

    check_attention_method(args.candidate_attention_quantization)  # before the reference runs
    ignored = [p.strip() for p in (args.ignored_layers or "").split(",") if p.strip()]
    cand_cfg = json_arg(args.candidate_quantization_config_json, "--candidate-quantization-config-json")
    reference = VariantSpec(args.reference_model or args.model, args.reference_quantization,
                            json_arg(args.reference_quantization_config_json, "--reference-quantization-config-json"),
                            "reference")
    candidate = VariantSpec(args.candidate_model or args.model, args.candidate_quantization,
                            with_ignored(args.candidate_quantization, cand_cfg, ignored), "candidate",
                            args.candidate_attention_quantization)
    return reference, candidate


def _params(args: argparse.Namespace):
    from diffquant.engine import SamplingParams

    return SamplingParams(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          height=args.height, width=args.width, num_frames=args.num_frames, seed=args.seed,
                          negative_prompt=args.negative_prompt)


def _check_paths(args: argparse.Namespace, specs: tuple[VariantSpec, VariantSpec]) -> None:
    """Model folders and the output location, checked before the slow imports and loads."""
    from diffquant.engine.loading import read_pipeline_info

    for spec in specs:
        read_pipeline_info(spec.model, warn=False)
    if Path(args.output_json).is_dir():
        raise ValueError(f"--output-json {args.output_json!r} is a directory")
    if args.enforce_eager and args.compile:
        raise ValueError("--enforce-eager and --compile exclude each other")
    if args.target_psnr is not None and not args.sensitivity:
        raise ValueError("--target-psnr needs --sensitivity")


def run_compare(args: argparse.Namespace) -> int:
    """`diffquant compare`: run, write the JSON, print the summary; 1 when a --fail-* gate misses."""
    below, above = parse_gate(args.fail_below, "--fail-below"), parse_gate(args.fail_above, "--fail-above")
    specs = _specs(args)
    params = _params(args)
    _check_paths(args, specs)
    kinds = GROUP_KINDS if args.sensitivity_groups == "all" else (args.sensitivity_groups,)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result = compare_diffusion_trajectory_similarity(
        *specs, args.prompt, params, task=args.task, warmup_runs=args.warmup_runs, measure_runs=args.measure_runs,
        save_output_dir=args.save_output_dir, device=args.device, compile=args.compile, drift_level=args.drift_level,
        sensitivity=args.sensitivity, target_psnr=args.target_psnr, sensitivity_groups=kinds, log=log)
    failures = check_gates(gate_metrics(result["output_metrics"]), below, above)
    result["gate"] = {"fail_below": below, "fail_above": above, "failures": failures, "passed": not failures}
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(format_summary(result))
    print(f"wrote {out}")
    for failure in failures:
        print(f"diffquant: gate failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _v(value: Any, fmt: str = ".4f") -> str:
    return "inf" if value is None else format(value, fmt)


def format_summary(result: dict[str, Any]) -> str:
    """The printed report: both variants, the output metrics vs thresholds, the trajectory, sensitivity."""
    lines = []
    for side in ("reference", "candidate"):
        g = result[f"{side}_generation"]
        peak = f", peak {g['max_peak_memory_mb']:.0f} MB" if g["max_peak_memory_mb"] is not None else ""
        lines.append(f"{side}: {g['quantization_summary']}; avg {g['avg_generation_time_s']:.2f} s{peak}")
    m = gate_metrics(result["output_metrics"])
    ident = " (identical outputs)" if m["identical"] else ""
    lines.append(f"output: psnr_db {_v(m['psnr_db'], '.2f')}{ident}  ssim {m['ssim']:.4f}  cosine "
                 f"{m['cosine_similarity']:.5f}  mae {m['mae']:.3f}  relative_l2 {m['relative_l2']:.4f}  "
                 f"max_abs {m['max_abs']:.0f}")
    table = result["thresholds"]
    for level in ("smoke", "stricter"):
        missed = [k for k, row in table.items() if not row[f"{level}_pass"]]
        lines.append(f"  {level} thresholds: {'pass' if not missed else 'MISS ' + ', '.join(missed)}")
    lines.append(_trajectory_line(result["trajectory"]))
    if "sensitivity" in result:
        lines.extend(_sensitivity_lines(result["sensitivity"]))
    return "\n".join(lines)


def _trajectory_line(traj: dict[str, Any]) -> str:
    rows = traj["steps"]
    if not rows:
        return "trajectory: no scheduler steps recorded"
    rel = " ".join(f"{r['relative_l2']:.4f}" for r in rows)
    first = traj["first_drift_step"]
    where = "never" if first is None else f"step {first}"
    return (f"trajectory (latent relative_l2 per step): {rel}\n"
            f"  first step with relative_l2 > {traj['drift_level_relative_l2']:g}: {where}")


def _sensitivity_lines(sens: dict[str, Any], top: int = 10) -> list[str]:
    lines = [f"sensitivity ({sens['method']}, each group quantized alone; worst first):"]
    for i, row in enumerate(sens["ranking"][:top], 1):
        lines.append(f"  {i:>2}. {row['pattern']:<36} {row['layers']:>3} layers  psnr_db {_v(row['psnr_db'], '.2f')}"
                     f"  mae {row['mae']:.3f}")
    greedy = sens.get("greedy")
    if greedy is not None:
        if greedy["reached"]:
            lines.append(f"suggested ignored_layers for psnr_db >= {greedy['target_psnr_db']:g}: "
                         f"{','.join(greedy['ignored_layers']) or '(none needed)'}  "
                         f"(psnr_db {_v(greedy['steps'][-1]['psnr_db'], '.2f')})")
        else:
            lines.append(f"target psnr_db {greedy['target_psnr_db']:g} not reached while quantizing any layer group")
    return lines


def main(argv: list[str] | None = None) -> int:
    from diffquant.cli import main as cli_main

    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["add_compare_arguments", "check_gates", "compare_diffusion_trajectory_similarity", "format_summary",
           "parse_gate", "run_compare"]

if __name__ == "__main__":
    sys.exit(main())
