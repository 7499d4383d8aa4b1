"""Architecture profiles: what diffusers does not know about quantizing each model family.

A profile names the pipeline and transformer classes it covers, which components are diffusion
transformers, the linear layers that stay high precision by default (modulation / AdaLN,
timestep and text embedders, patch embedding, norm_out, the final proj_out: quantizing them turns
images to noise, DESIGN decision 8), the recommended ignored_layers, and sampling defaults.

Layer names are diffusers 0.42 module names (diffusers/models/transformers/transformer_*.py).
Patterns follow diffquant.quantization.patterns: "norm1.linear" matches that dotted run anywhere;
"re:^proj_out$" only the top-level output projection (FLUX single blocks also have a `proj_out`,
a large layer that is safe to quantize).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINAL_PROJ = "re:^proj_out$"


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-architecture defaults; None leaves the pipeline's own default."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None


@dataclass(frozen=True)
class ArchitectureProfile:
    name: str
    display_name: str
    pipeline_classes: tuple[str, ...]
    transformer_classes: tuple[str, ...]
    keep_high_precision: tuple[str, ...]
    transformers: tuple[str, ...] = ("transformer",)
    recommended_ignored_layers: tuple[str, ...] = ()
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    video: bool = False
    # extra test on the pipeline's model_index.json + transformer config.json, for variants
    matches: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None
    hf_models: tuple[str, ...] = ()
    # fixed keyword arguments for the pipeline call (the embedded model's short prompt length)
    call_kwargs: tuple[tuple[str, Any], ...] = ()

    def transformer_components(self, available: list[str]) -> list[str]:
        return [c for c in self.transformers if c in available]


FLUX1_KEEP = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "time_text_embed",
              "x_embedder", "context_embedder", FINAL_PROJ)
FLUX2_KEEP = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
              "time_guidance_embed", "x_embedder", "context_embedder", "norm_out.linear", FINAL_PROJ)
QWEN_IMAGE_KEEP = ("img_mod", "txt_mod", "time_text_embed", "img_in", "txt_in", "norm_out.linear", FINAL_PROJ)
Z_IMAGE_KEEP = ("adaLN_modulation", "t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer",
                "siglip_embedder")
WAN_KEEP = ("condition_embedder", "patch_embedding", FINAL_PROJ)
HUNYUAN_KEEP = ("x_embedder", "image_embedder", "context_embedder", "context_embedder_2", "time_embed",
                "time_guidance_embed", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
                FINAL_PROJ)
COSMOS_KEEP = ("patch_embed", "time_embed", "time_embedder", "norm1", "norm2", "norm3", "norm_out",
               "crossattn_proj", "img_context_proj", "proj_in", "lm_head", FINAL_PROJ)
# Unknown architectures: common names of modulation (AdaLN), embedders and the output head.
GENERIC_KEEP = ("*modulation*", "*_mod", "adaln*", "adaLN*", "norm1.linear", "norm1_context.linear", "norm.linear",
                "norm_out", "*embed*", "caption_projection", "condition_embedder", FINAL_PROJ)


def _flux_guidance(index: dict, tcfg: dict) -> bool:
    return bool(tcfg.get("guidance_embeds", False))


def _wan_two_experts(index: dict, tcfg: dict) -> bool:
    return _present(index, "transformer_2")


def _wan_ti2v(index: dict, tcfg: dict) -> bool:
    return bool(index.get("expand_timesteps")) and not _present(index, "transformer_2")


EMBEDDED_MARKER = "_diffquant_model"  # model_index.json key of the embedded model (diffusers skips "_" keys)


def _embedded(index: dict, tcfg: dict) -> bool:
    return index.get(EMBEDDED_MARKER) == "tiny-shapes"


def _present(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, (list, tuple)) and value[0] is not None


_QWEN_DEFAULTS = SamplingDefaults(num_inference_steps=50, true_cfg_scale=4.0, height=1328, width=1328)
_WAN_A14B = SamplingDefaults(num_inference_steps=40, guidance_scale=4.0, height=480, width=832, num_frames=81)

PROFILES: tuple[ArchitectureProfile, ...] = (
    ArchitectureProfile(
        "diffquant-tiny", "diffquant tiny shapes model (embedded)", ("FluxPipeline",), ("FluxTransformer2DModel",),
        FLUX1_KEEP, matches=_embedded, defaults=SamplingDefaults(8, None, None, 64, 64),
        call_kwargs=(("max_sequence_length", 16),)),
    ArchitectureProfile(
        "flux1-dev", "FLUX.1-dev", ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                                    "FluxKontextPipeline", "FluxFillPipeline"),
        ("FluxTransformer2DModel",), FLUX1_KEEP, matches=_flux_guidance,
        defaults=SamplingDefaults(28, 3.5, None, 1024, 1024), hf_models=("black-forest-labs/FLUX.1-dev",)),
    ArchitectureProfile(
        "flux1-schnell", "FLUX.1-schnell", ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
        ("FluxTransformer2DModel",), FLUX1_KEEP, defaults=SamplingDefaults(4, 0.0, None, 1024, 1024),
        hf_models=("black-forest-labs/FLUX.1-schnell",)),
    ArchitectureProfile(
        "flux2-klein", "FLUX.2-klein", ("Flux2KleinPipeline", "Flux2Pipeline", "Flux2KleinKVPipeline"),
        ("Flux2Transformer2DModel",), FLUX2_KEEP, defaults=SamplingDefaults(4, 1.0, None, 1024, 1024),
        hf_models=("black-forest-labs/FLUX.2-klein-4B",)),
    ArchitectureProfile(
        "qwen-image", "Qwen-Image", ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
        ("QwenImageTransformer2DModel",), QWEN_IMAGE_KEEP, recommended_ignored_layers=("img_mlp",),
        defaults=_QWEN_DEFAULTS, hf_models=("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512")),
    ArchitectureProfile(
        "qwen-image-edit", "Qwen-Image-Edit", ("QwenImageEditPipeline", "QwenImageEditInpaintPipeline"),
        ("QwenImageTransformer2DModel",), QWEN_IMAGE_KEEP, recommended_ignored_layers=("img_mlp",),
        defaults=SamplingDefaults(50, None, 4.0), hf_models=("Qwen/Qwen-Image-Edit",)),
    ArchitectureProfile(
        "qwen-image-edit-plus", "Qwen-Image-Edit-Plus", ("QwenImageEditPlusPipeline",),
        ("QwenImageTransformer2DModel",), QWEN_IMAGE_KEEP, recommended_ignored_layers=("img_mlp",),
        defaults=SamplingDefaults(40, None, 4.0), hf_models=("Qwen/Qwen-Image-Edit-2509",)),
    ArchitectureProfile(
        "qwen-image-layered", "Qwen-Image-Layered", ("QwenImageLayeredPipeline",),
        ("QwenImageTransformer2DModel",), QWEN_IMAGE_KEEP, recommended_ignored_layers=("img_mlp",),
        defaults=SamplingDefaults(50, None, 4.0), hf_models=("Qwen/Qwen-Image-Layered",)),
    ArchitectureProfile(
        "z-image", "Z-Image", ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline",
                               "ZImageOmniPipeline"),
        ("ZImageTransformer2DModel",), Z_IMAGE_KEEP, defaults=SamplingDefaults(9, 0.0, None, 1024, 1024),
        hf_models=("Tongyi-MAI/Z-Image-Turbo",)),
    ArchitectureProfile(
        "wan2.2-a14b", "Wan2.2 A14B (T2V)", ("WanPipeline",), ("WanTransformer3DModel",), WAN_KEEP,
        transformers=("transformer", "transformer_2"), defaults=_WAN_A14B, video=True, matches=_wan_two_experts,
        hf_models=("Wan-AI/Wan2.2-T2V-A14B-Diffusers",)),
    ArchitectureProfile(
        "wan2.2-i2v-a14b", "Wan2.2 A14B (I2V)", ("WanImageToVideoPipeline",), ("WanTransformer3DModel",),
        WAN_KEEP, transformers=("transformer", "transformer_2"), video=True,
        defaults=SamplingDefaults(40, 3.5, None, 480, 832, 81), hf_models=("Wan-AI/Wan2.2-I2V-A14B-Diffusers",)),
    ArchitectureProfile(
        "wan2.2-ti2v-5b", "Wan2.2 TI2V-5B", ("WanPipeline",), ("WanTransformer3DModel",), WAN_KEEP,
        video=True, matches=_wan_ti2v, defaults=SamplingDefaults(50, 5.0, None, 704, 1280, 121),
        hf_models=("Wan-AI/Wan2.2-TI2V-5B-Diffusers",)),
    ArchitectureProfile(
        "wan", "Wan (2.1 / 2.2 single expert)", ("WanPipeline", "WanVideoToVideoPipeline"),
        ("WanTransformer3DModel",), WAN_KEEP, transformers=("transformer", "transformer_2"), video=True,
        defaults=SamplingDefaults(50, 5.0, None, 480, 832, 81)),
    ArchitectureProfile(
        "hunyuanvideo-1.5", "HunyuanVideo-1.5", ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
        ("HunyuanVideo15Transformer3DModel",), HUNYUAN_KEEP, video=True,
        defaults=SamplingDefaults(50, None, None, 480, 848, 121),
        hf_models=("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",)),
    ArchitectureProfile(
        "hunyuanimage", "HunyuanImage-2.1", ("HunyuanImagePipeline", "HunyuanImageRefinerPipeline"),
        ("HunyuanImageTransformer2DModel",), HUNYUAN_KEEP, defaults=SamplingDefaults(50, None, None, 2048, 2048),
        hf_models=("hunyuanvideo-community/HunyuanImage-2.1-Diffusers",)),
    ArchitectureProfile(
        "cosmos", "Cosmos", ("Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline",
                             "CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline",
                             "Cosmos2_5_PredictBasePipeline", "Cosmos3OmniPipeline"),
        ("CosmosTransformer3DModel", "Cosmos3OmniTransformer"), COSMOS_KEEP,
        defaults=SamplingDefaults(35, 7.0), hf_models=("nvidia/Cosmos-Predict2-2B-Text2Image",)),
)

GENERIC = ArchitectureProfile("generic", "unknown architecture (generic defaults)", (), (), GENERIC_KEEP,
                              transformers=("transformer", "transformer_2"))
PROFILE_BY_NAME = {p.name: p for p in PROFILES}


def _component_class(index: dict, name: str) -> str | None:
    value = index.get(name)
    return value[1] if isinstance(value, (list, tuple)) and len(value) == 2 else None


def detect_profile(index: dict[str, Any], transformer_config: dict[str, Any] | None = None,
                   warn: bool = True) -> ArchitectureProfile:
    """The profile for a pipeline's model_index.json (pipeline `_class_name`, else transformer class).

    Among profiles that match the class, the first whose `matches` accepts the configs wins (a
    profile without `matches` accepts all). Unknown architectures get GENERIC and one warning.
    """
    tcfg = transformer_config or {}
    pipeline_cls = index.get("_class_name", "")
    transformer_cls = _component_class(index, "transformer")
    candidates = [p for p in PROFILES if pipeline_cls in p.pipeline_classes]
    if not candidates:
        candidates = [p for p in PROFILES if transformer_cls in p.transformer_classes]
    for profile in candidates:
        if profile.matches is None or profile.matches(index, tcfg):
            return profile
    if warn:
        warnings.warn(f"diffquant: no architecture profile for {pipeline_cls or '?'} (transformer "
                      f"{transformer_cls or '?'}); using generic defaults: layers kept high precision are "
                      f"guessed from common names, check the quantization report", stacklevel=3)
    return GENERIC


def keep_patterns(name: str) -> tuple[str, ...]:
    """The keep-high-precision patterns of profile `name` (demo and tests use FLUX's)."""
    return PROFILE_BY_NAME[name].keep_high_precision


__all__ = ["GENERIC", "PROFILES", "PROFILE_BY_NAME", "ArchitectureProfile", "SamplingDefaults", "detect_profile",
           "keep_patterns"]
