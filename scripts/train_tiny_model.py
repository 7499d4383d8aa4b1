"""Train the embedded tiny text-to-image model (FLUX architecture) on procedural shape images.

Seeded and self-contained: data is rendered on the device by diffquant.tiny.shapes, nothing is
downloaded. Stage 1 trains the VAE (reconstruction + a small KL term), stage 2 trains the
transformer and both text encoders jointly with the rectified-flow objective FLUX uses
(x_t = (1 - s) x0 + s eps, predict eps - x0). The pipeline folder is written with save_pretrained.

    python scripts/train_tiny_model.py --out /tmp/tiny                        # from scratch, on the H200
    python scripts/train_tiny_model.py --out /tmp/t --vae-steps 5 --steps 5   # smoke test

The shipped diffquant/assets/tiny-shapes came from five stages, each continuing the previous one
with --init (its training.json nests them). Stages 1-4 ran earlier versions of this script (git
history; stage 4 at commit 022dc10), the last one this version:
  1. H200: --vae-steps 600, 1038 flow steps, batch 128, seed 1234
  2. CPU: --lr 3e-4 --seed 4321, 1056 steps, batch 32      3. CPU: --lr 2e-4 --seed 777, 2253 steps, batch 32
  4. H200: --decoder-steps 2500 --batch 256 --lr 3e-4 --max-flow-seconds 270 (2085 steps, plain MSE)
  5. H200: --batch 256 --lr 3e-4 --steps 4495 (object weight 4; ran as --max-flow-seconds 370)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.tiny import shapes
from diffquant.tiny.evaluate import accuracy
from diffquant.tiny.model import TEXT_LEN, components

TRAIN_SEED = 1234  # the evaluation draws prompts with a different seed
AUTOCAST = False  # fp32 (+TF32 on CUDA): bf16 autocast hit CUBLAS_STATUS_EXECUTION_FAILED in backward on the H200


class ShapeData:
    """Training data made on the device: attributes sampled there, images rendered there, and every
    caption of the grammar tokenized once up front (row index = the attributes' mixed-radix number),
    so a step spends no CPU time on Python lists or tokenizers (this took ~130 ms per step at batch
    256 on the H200 host, more than the model)."""

    RADIX = (len(shapes.COLORS), len(shapes.SHAPES), len(shapes.COLORS), len(shapes.POSITIONS), len(shapes.SIZES))

    def __init__(self, pipe, device: torch.device, seed: int):
        self.g = torch.Generator(device).manual_seed(seed)
        combos = torch.cartesian_prod(*(torch.arange(k) for k in self.RADIX)).tolist()
        names = (shapes.COLORS, shapes.SHAPES, shapes.COLORS, shapes.POSITIONS, shapes.SIZES)
        captions = [shapes.caption(shapes.Attributes(*(n[i] for n, i in zip(names, row, strict=True))))
                    for row in combos] + [""]  # last row: the empty caption (classifier-free guidance)
        tok = dict(padding="max_length", truncation=True, return_tensors="pt")
        self.ids = pipe.tokenizer(captions, max_length=pipe.tokenizer_max_length, **tok).input_ids.to(device)
        self.ids_2 = pipe.tokenizer_2(captions, max_length=TEXT_LEN, **tok).input_ids.to(device)
        strides = [math.prod(self.RADIX[i + 1:]) for i in range(len(self.RADIX))]
        self.strides = torch.tensor(strides, device=device)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(attribute index rows [n, 5], images [n, 3, H, W], object masks [n, 1, H, W])."""
        g, dev = self.g, self.g.device
        draw = [torch.randint(k, (n,), generator=g, device=dev) for k in self.RADIX]
        draw[2] = (draw[0] + 1 + torch.randint(len(shapes.COLORS) - 1, (n,), generator=g, device=dev)) % len(
            shapes.COLORS)  # background: any other color
        idx = torch.stack(draw, dim=1)
        img, mask = shapes.render_indices(idx, jitter=shapes.random_jitter(n, g))
        return idx, img, mask

    def token_ids(self, idx: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tokenizers' ids for the captions of `idx`; rows where `drop` get the empty caption."""
        row = torch.where(drop, len(self.ids) - 1, (idx * self.strides).sum(1))
        return self.ids[row], self.ids_2[row]


def encode_ids(pipe, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence embeddings, CLIP pooled embedding): FluxPipeline.encode_prompt without tokenizing."""
    pooled = pipe.text_encoder(ids, output_hidden_states=False).pooler_output
    return pipe.text_encoder_2(ids_2, output_hidden_states=False)[0], pooled


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _recon_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float = 8.0) -> torch.Tensor:
    """MSE + L1, with the object's pixels weighted up: a small shape covers ~4% of the image, and its
    corners are what tells a square from a circle. The corner pixel is always background."""
    obj = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
    w = 1 + object_weight * obj
    err = rec.float() - x
    return (w * (err.square() + 0.1 * err.abs())).mean()


def train_vae(vae, steps: int, batch: int, data: ShapeData, device, log, decoder_only: bool = False,
              lr: float = 1e-3) -> None:
    """Train the VAE; with decoder_only the encoder (and so the latent space the transformer learned)
    stays fixed and only the decoder is fine-tuned."""
    if decoder_only:
        for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()]:
            p.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        _, x, _ = data.sample(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            if decoder_only:
                with torch.no_grad():
                    post = vae.encode(x).latent_dist
                rec = vae.decode(post.mean).sample
            else:
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample(generator=None)).sample
        loss = _recon_loss(rec, x) + (0.0 if decoder_only else 1e-6 * post.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def recon_accuracy(vae, g, device, n: int = 512) -> dict[str, float]:
    """How often the classifier reads the right attributes back from VAE reconstructions: the
    ceiling for what the transformer can reach."""
    attrs = shapes.sample_attributes(n, g)
    x = shapes.render(attrs, generator=g, device=device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return {f: round(v, 4) for f, v in accuracy(shapes.to_uint8(rec).cpu(), attrs).items()}


@torch.no_grad()
def set_latent_stats(vae, data: ShapeData) -> None:
    _, x, _ = data.sample(512)
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def _object_weight(mask: torch.Tensor, side: int, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weight [B, 1, side, side]: 1 + weight where the (dilated) object is, so
    the few latents that carry the shape are not drowned by the background's."""
    m = F.adaptive_max_pool2d(mask, side)
    return 1 + weight * F.max_pool2d(m, 3, stride=1, padding=1)


def train_flow(pipe, steps: int, batch: int, data: ShapeData, device, log, max_seconds: float | None = None,
               lr: float = 5e-4, object_weight: float = 4.0) -> int:
    """Returns the number of steps run: with max_seconds, the step count is cut after timing steps
    10-60 so that the run (and its cosine schedule) fits; rerun with --steps N to reproduce."""
    from diffusers import FluxPipeline

    vae, tr = pipe.vae, pipe.transformer
    params = [*tr.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    for m in (tr, pipe.text_encoder, pipe.text_encoder_2):
        m.train()
    side = shapes.IMAGE_SIZE // 4  # latent side
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side // 2, side // 2, device, torch.float32)
    txt_ids = torch.zeros(TEXT_LEN, 3, device=device)
    g = data.g
    step, t_start = 0, time.perf_counter()
    while step < steps:
        if max_seconds is not None and step in (10, 60):  # time steps 10-60: the first ones warm up
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 10:
                t_start = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_start) / 50
                steps = max(step + 1, min(steps, int(max_seconds / per_step)))
                log(f"{per_step * 1e3:.1f} ms/step: running {steps} steps")
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx, x, mask = data.sample(batch)
        drop = torch.rand(batch, generator=g, device=g.device) < 0.1  # empty caption, for CFG
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        sigma = torch.sigmoid(torch.randn(batch, generator=g, device=g.device))  # logit-normal timesteps
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            emb, pooled = encode_ids(pipe, *data.token_ids(idx, drop))
            pred = tr(
                hidden_states=FluxPipeline._pack_latents(xt, batch, 4, side, side),
                timestep=sigma,
                pooled_projections=pooled,
                encoder_hidden_states=emb,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        size = shapes.IMAGE_SIZE
        err = FluxPipeline._unpack_latents(pred.float(), size, size, pipe.vae_scale_factor) - (noise - x0)
        loss = (_object_weight(mask, side, object_weight) * err.square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"flow step {step} loss {loss.item():.5f}")
        step += 1
    for m in (tr, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    return steps


def mark_embedded(out: Path) -> None:
    """Tag the folder as the embedded model (diffusers ignores "_" keys) and name the tokenizer class
    every transformers version knows (5.x would write its new name, TokenizersBackend)."""
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_diffquant_model"] = "tiny-shapes"
    for name in ("tokenizer", "tokenizer_2"):
        index[name] = ["transformers", "PreTrainedTokenizerFast"]
        cfg_file = out / name / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    index_file.write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--init", default=None, help="continue from this pipeline folder")
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="with --init: fine-tune the VAE decoder this many steps (encoder, latent space kept)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--object-weight", type=float, default=4.0, help="extra flow-loss weight on object latents")
    ap.add_argument("--max-flow-seconds", type=float, default=None, help="cut --steps to fit this time")
    args = ap.parse_args()

    from diffusers import FluxPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    if args.init:
        pipe = FluxPipeline.from_pretrained(args.init, torch_dtype=torch.float32).to(device)
    else:
        pipe = FluxPipeline(**components(args.seed)).to(device)
    data = ShapeData(pipe, device, args.seed)
    if not args.init:
        train_vae(pipe.vae, args.vae_steps, 64, data, device, log)
        set_latent_stats(pipe.vae, data)
    if args.decoder_steps:
        train_vae(pipe.vae, args.decoder_steps, 64, data, device, log, decoder_only=True, lr=2e-4)
    recon = recon_accuracy(pipe.vae, g, device)
    log(f"VAE reconstruction read back: {recon}")
    log(f"latent shift {pipe.vae.config.shift_factor:.4f} scale {pipe.vae.config.scaling_factor:.4f}")
    for p in pipe.vae.parameters():
        p.requires_grad_(False)
    steps_run = train_flow(pipe, args.steps, args.batch, data, device, log, args.max_flow_seconds, args.lr,
                           args.object_weight)
    out = Path(args.out)
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    mark_embedded(out)
    previous = json.loads((Path(args.init) / "training.json").read_text()) if args.init else None
    meta = {
        "previous_stage": previous,
        "lr": args.lr,
        "seed": args.seed,
        "vae_steps": 0 if args.init else args.vae_steps,
        "decoder_steps": args.decoder_steps,
        "vae_reconstruction_accuracy": recon,
        "steps": steps_run,
        "batch": args.batch,
        "object_weight": args.object_weight,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"saved {out}")


if __name__ == "__main__":
    main()
