"""Text to image (or video) with a quantized diffusers pipeline.

    python examples/text_to_image.py --model /path/to/Qwen-Image --quantization fp8 --ignored-layers img_mlp
    python examples/text_to_image.py --model /path/to/FLUX.1-dev --quantization int8 --prompt "a red fox"
"""

from __future__ import annotations

import argparse

from diffquant import Engine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers pipeline folder")
    parser.add_argument("--quantization", default=None, help="fp8, int8, ... (default: none, bf16)")
    parser.add_argument("--ignored-layers", default="", help="comma-separated layer patterns kept in bf16")
    parser.add_argument("--prompt", default="A cat sitting on a windowsill")
    parser.add_argument("--num-inference-steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="text_to_image.png")
    args = parser.parse_args()

    ignored = [p for p in args.ignored_layers.split(",") if p]
    config = {"method": args.quantization, "ignored_layers": ignored} if args.quantization and ignored else None
    engine = Engine(model=args.model, quantization=None if config else args.quantization, quantization_config=config)
    print(engine.summary())
    out = engine.generate(args.prompt, SamplingParams(num_inference_steps=args.num_inference_steps, height=args.height,
                                                       width=args.width, seed=args.seed), progress=True)
    saved = out.save(args.output)
    print(f"saved {', '.join(map(str, saved))}; timings {({k: round(v, 2) for k, v in out.timings.items()})}")


if __name__ == "__main__":
    main()
