"""Architecture profiles: detection from model_index.json, and each profile's keep-high-precision
patterns against the real diffusers module names of a tiny transformer built from config."""

from __future__ import annotations

import warnings

import diffusers
import pytest
import torch

from diffquant.engine.models import GENERIC, PROFILE_BY_NAME, PROFILES, detect_profile
from diffquant.quantization import quantize_

# profile -> (transformer class, tiny config, layers that must stay bf16, layers that must be quantized)
TINY = {
    "flux1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True),
        ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
         "single_transformer_blocks.0.norm.linear", "time_text_embed.guidance_embedder.linear_1", "x_embedder",
         "context_embedder", "norm_out.linear", "proj_out"],
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out",
         "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.to_add_out"]),
    "flux2-klein": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)),
        ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
         "single_stream_modulation.linear",
         "time_guidance_embed.timestep_embedder.linear_1", "x_embedder", "context_embedder", "norm_out.linear",
         "proj_out"],
        ["transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
         "single_transformer_blocks.0.attn.to_out"]),
    "qwen-image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        ["transformer_blocks.0.img_mod.1", "transformer_blocks.0.txt_mod.1", "img_in", "txt_in",
         "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"],
        ["transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.txt_mlp.net.0.proj",
         "transformer_blocks.0.attn.to_q"]),
    "z-image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]),
        ["layers.0.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0", "t_embedder.mlp.0", "cap_embedder.1",
         "all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1"],
        ["layers.0.attention.to_q", "layers.0.feed_forward.w1", "context_refiner.0.feed_forward.w2"]),
    "wan2.2-a14b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=1, image_dim=32, added_kv_proj_dim=32),
        ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj",
         "condition_embedder.text_embedder.linear_2", "condition_embedder.image_embedder.ff.net.2", "proj_out"],
        ["blocks.0.attn1.to_q", "blocks.0.attn2.add_k_proj", "blocks.0.ffn.net.2"]),
    "hunyuanvideo-1.5": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_refiner_layers=1,
        text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(4, 6, 6)),
        ["image_embedder.linear_1", "context_embedder.proj_in", "context_embedder_2.linear_3",
         "time_embed.timestep_embedder.linear_1", "transformer_blocks.0.norm1.linear",
         "transformer_blocks.0.norm1_context.linear", "norm_out.linear", "proj_out"],
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2"]),
    "hunyuanimage": ("HunyuanImageTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=16, rope_axes_dim=(8, 8), guidance_embeds=True),
        ["time_guidance_embed.guidance_embedder.linear_1", "single_transformer_blocks.0.norm.linear",
         "transformer_blocks.0.norm1.linear", "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
         "norm_out.linear", "proj_out"],
        ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp",
         "transformer_blocks.0.ff.net.2"]),
    "cosmos": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, text_embed_dim=32,
        adaln_lora_dim=8, max_size=(8, 16, 16), encoder_hidden_states_channels=32),
        ["patch_embed.proj", "time_embed.t_embedder.linear_1", "transformer_blocks.0.norm1.linear_1",
         "transformer_blocks.0.norm3.linear_2", "norm_out.linear_2", "proj_out"],
        ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.net.2"]),
}


@pytest.mark.parametrize("profile_name", sorted(TINY))
def test_keep_patterns_on_real_module_names(profile_name):
    cls_name, config, keep, quantize = TINY[profile_name]
    profile = PROFILE_BY_NAME[profile_name]
    assert cls_name in profile.transformer_classes
    torch.manual_seed(0)
    model = torch.nn.Module.to(getattr(diffusers, cls_name)(**config), torch.bfloat16)
    report = quantize_(model, "fp8", keep_high_precision=profile.keep_high_precision)
    by_name = {r.name: r for r in report.layers}
    for name in keep:
        assert by_name[name].action == "kept", (name, by_name[name].reason)
        assert "kept high precision by default" in by_name[name].reason
    for name in quantize:
        assert by_name[name].action == "quantized", name
    assert len(report.quantized) >= len(quantize)


def _index(pipeline: str, transformer: str, **extra) -> dict:
    return {"_class_name": pipeline, "transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKL"],
            **extra}


@pytest.mark.parametrize("index,tcfg,expected", [
    (_index("FluxPipeline", "FluxTransformer2DModel"), {"guidance_embeds": True}, "flux1-dev"),
    (_index("FluxPipeline", "FluxTransformer2DModel"), {"guidance_embeds": False}, "flux1-schnell"),
    (_index("Flux2KleinPipeline", "Flux2Transformer2DModel"), {}, "flux2-klein"),
    (_index("QwenImagePipeline", "QwenImageTransformer2DModel"), {}, "qwen-image"),
    (_index("QwenImageEditPipeline", "QwenImageTransformer2DModel"), {}, "qwen-image-edit"),
    (_index("QwenImageEditPlusPipeline", "QwenImageTransformer2DModel"), {}, "qwen-image-edit-plus"),
    (_index("QwenImageLayeredPipeline", "QwenImageTransformer2DModel"), {}, "qwen-image-layered"),
    (_index("ZImagePipeline", "ZImageTransformer2DModel"), {}, "z-image"),
    (_index("WanPipeline", "WanTransformer3DModel", transformer_2=["diffusers", "WanTransformer3DModel"],
            boundary_ratio=0.875), {}, "wan2.2-a14b"),
    (_index("WanPipeline", "WanTransformer3DModel", transformer_2=[None, None], expand_timesteps=True), {},
     "wan2.2-ti2v-5b"),
    (_index("WanImageToVideoPipeline", "WanTransformer3DModel"), {}, "wan2.2-i2v-a14b"),
    (_index("WanPipeline", "WanTransformer3DModel", transformer_2=[None, None]), {}, "wan"),
    (_index("HunyuanVideo15Pipeline", "HunyuanVideo15Transformer3DModel"), {}, "hunyuanvideo-1.5"),
    (_index("HunyuanImagePipeline", "HunyuanImageTransformer2DModel"), {}, "hunyuanimage"),
    (_index("Cosmos2TextToImagePipeline", "CosmosTransformer3DModel"), {}, "cosmos"),
    (_index("MyCustomFluxPipeline", "FluxTransformer2DModel"), {"guidance_embeds": True}, "flux1-dev"),
])
def test_detect_profile(index, tcfg, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_profile(index, tcfg).name == expected


def test_unknown_architecture_gets_generic_defaults_and_one_warning():
    with pytest.warns(UserWarning, match="no architecture profile for SomePipeline") as record:
        profile = detect_profile(_index("SomePipeline", "SomeTransformer"))
    assert profile is GENERIC and len(record) == 1


def test_profiles_cover_the_supported_families():
    names = {p.name for p in PROFILES}
    assert {"flux1-dev", "flux1-schnell", "flux2-klein", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus",
            "qwen-image-layered", "z-image", "wan2.2-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "hunyuanvideo-1.5",
            "hunyuanimage", "cosmos"} <= names
    assert PROFILE_BY_NAME["qwen-image"].recommended_ignored_layers == ("img_mlp",)
    assert PROFILE_BY_NAME["wan2.2-a14b"].transformers == ("transformer", "transformer_2")
