"""A small quantize-and-report demo on a tiny, randomly initialised FLUX transformer (no download)."""

from __future__ import annotations

import copy

import torch

from diffquant.engine.models import FLUX1_KEEP as FLUX_KEEP  # modulation, embedders, output head
from diffquant.quantization import quantize_
from diffquant.quantization.metrics import sqnr_db


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24),
    )
    # nn.Module.to: diffusers' own .to() warns about float32 modules this model does not have
    return torch.nn.Module.to(model, dtype).eval()


def flux_inputs(model, tokens: int = 64, text: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = next(model.parameters()).dtype
    cfg = model.config
    side = int(tokens**0.5)
    pos = torch.arange(tokens)
    img_ids = torch.stack([torch.zeros(tokens), (pos // side).float(), (pos % side).float()], dim=-1)  # [T, 3]
    return dict(
        hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(dt),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dt),
        timestep=torch.tensor([0.5]).to(dt),
        img_ids=img_ids.float(),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def run_demo(method: str = "fp8", ignored_layers: str = "", seed: int = 0, verbose: bool = False) -> str:
    model = tiny_flux(seed)
    inputs = flux_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        qmodel = copy.deepcopy(model)
        config = {"method": method, "ignored_layers": [p for p in ignored_layers.split(",") if p]}
        report = quantize_(qmodel, config, keep_high_precision=FLUX_KEEP)
        out = qmodel(**inputs)[0]
    lines = [report.table()] if verbose else []
    lines.append(report.summary())
    lines.append(f"output SQNR vs bf16 (tiny random-weight FLUX, 2+2 blocks): {sqnr_db(ref, out):.1f} dB")
    return "\n".join(lines)
