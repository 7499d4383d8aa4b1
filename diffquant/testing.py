"""Tiny random-weight diffusers pipelines for tests and examples (no hub access needed).

Each builder writes a complete diffusers pipeline folder (`model_index.json` + components) with
a few thousand parameters per component, so a full `Engine.generate` runs in about a second on a
CPU. Tokenizers are built from scratch: a byte-level BPE with no merges (one token per UTF-8
byte), wrapped in `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

_SPECIALS = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>"]
# A chat template for pipelines that call tokenizer.apply_chat_template (Z-Image).
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(model_max_length: int = 77, bos: bool = False):
    """A PreTrainedTokenizerFast with one token per byte (vocab 256 + specials); `vocab_size()` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=model_max_length, additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


VOCAB = len(_SPECIALS) + 256
EOS_ID = _SPECIALS.index("</s>")
BOS_ID = _SPECIALS.index("<s>")
PAD_ID = 0


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _image_vae(latent_channels: int):
    """AutoencoderKL with two blocks: spatial factor 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    )


def _clip_text(hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=hidden, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        bos_token_id=_SPECIALS.index("<s>"),
    ))


def _t5(hidden: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=VOCAB, d_model=hidden, d_ff=48, d_kv=8, num_layers=2, num_heads=2,
              relative_attention_num_buckets=8, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=0)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def _qwen25_vl(hidden: int = 16):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                rope_theta=1000000.0, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=VOCAB, hidden_size=hidden,
                           vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2, image_token_id=VOCAB - 1,
                           video_token_id=VOCAB - 4, eos_token_id=EOS_ID)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3(hidden: int = 16):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                                  max_position_embeddings=2048))


def build_flux(guidance_embeds: bool = True) -> dict:
    """FLUX.1 (dev when guidance_embeds, schnell otherwise): CLIP + T5 text encoders, 16-ch latents."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds,
    )
    return dict(cls=FluxPipeline, scheduler=_flow_scheduler(), vae=_image_vae(4), text_encoder=_clip_text(),
                tokenizer=byte_tokenizer(77), text_encoder_2=_t5(), tokenizer_2=byte_tokenizer(512),
                transformer=transformer, image_encoder=None, feature_extractor=None)


def build_qwen_image() -> dict:
    """Qwen-Image: Qwen2.5-VL text encoder, Qwen-Image (Wan-style) VAE."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return dict(cls=QwenImagePipeline, scheduler=_flow_scheduler(), vae=vae, text_encoder=_qwen25_vl(),
                tokenizer=byte_tokenizer(2048), transformer=transformer)


def build_z_image() -> dict:
    """Z-Image: Qwen3 text encoder (chat template), FLUX-style VAE."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[512, 32, 32],
    )
    return dict(cls=ZImagePipeline, scheduler=_flow_scheduler(), vae=_image_vae(4), text_encoder=_qwen3(),
                tokenizer=byte_tokenizer(2048), transformer=transformer)


def build_flux2_klein() -> dict:
    """FLUX.2-klein: Qwen3 causal LM text encoder (hidden states of layers 9, 18, 27), FLUX.2 VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=EOS_ID, pad_token_id=PAD_ID))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
    return dict(cls=Flux2KleinPipeline, scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder,
                tokenizer=byte_tokenizer(2048), transformer=transformer, is_distilled=True)


def build_hunyuanimage() -> dict:
    """HunyuanImage-2.1: Qwen2.5-VL + ByT5-style T5 text encoders, HunyuanImage VAE (32x spatial)."""
    from diffusers import AutoencoderKLHunyuanImage, HunyuanImagePipeline, HunyuanImageTransformer2DModel

    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=32, rope_axes_dim=(8, 8))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=2, sample_size=32, scaling_factor=1.0)
    return dict(cls=HunyuanImagePipeline, scheduler=_flow_scheduler(), vae=vae, text_encoder=_qwen25_vl(),
                tokenizer=byte_tokenizer(2048), text_encoder_2=_t5(), tokenizer_2=byte_tokenizer(128),
                transformer=transformer, guider=None, ocr_guider=None)


def build_hunyuanvideo15() -> dict:
    """HunyuanVideo-1.5 T2V: Qwen2.5-VL text model + ByT5-style T5, HunyuanVideo-1.5 VAE, CFG guider."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import Qwen2_5_VLTextModel

    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_refiner_layers=1,
        text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v",
        target_size=32)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                      spatial_compression_ratio=2, temporal_compression_ratio=2, scaling_factor=1.0)
    text_encoder = Qwen2_5_VLTextModel(_qwen25_vl().config.text_config)
    return dict(cls=HunyuanVideo15Pipeline, scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder,
                tokenizer=byte_tokenizer(2048), text_encoder_2=_t5(), tokenizer_2=byte_tokenizer(256),
                transformer=transformer, guider=ClassifierFreeGuidance(guidance_scale=3.0))


def build_pixart_sigma() -> dict:
    """PixArt-Sigma: an architecture without a diffquant profile (generic defaults)."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, caption_channels=32, sample_size=16, norm_num_groups=4)
    return dict(cls=PixArtSigmaPipeline, scheduler=DDIMScheduler(), vae=_image_vae(4), text_encoder=_t5(),
                tokenizer=byte_tokenizer(300), transformer=transformer)


def _wan_transformer(in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=in_channels, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )


def build_wan22(two_experts: bool = True) -> dict:
    """Wan2.2 T2V: UMT5 text encoder, Wan VAE; A14B layout (transformer + transformer_2) by default."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(1)
    second = _wan_transformer() if two_experts else None
    return dict(cls=WanPipeline, scheduler=_flow_scheduler(shift=5.0), vae=vae, text_encoder=_t5(umt5=True),
                tokenizer=byte_tokenizer(512), transformer=_wan_transformer(), transformer_2=second,
                boundary_ratio=0.875 if two_experts else None)


BUILDERS: dict[str, Callable[[], dict]] = {
    "flux1-dev": lambda: build_flux(True),
    "flux1-schnell": lambda: build_flux(False),
    "flux2-klein": build_flux2_klein,
    "qwen-image": build_qwen_image,
    "z-image": build_z_image,
    "hunyuanimage": build_hunyuanimage,
    "hunyuanvideo-1.5": build_hunyuanvideo15,
    "pixart-sigma": build_pixart_sigma,
    "wan2.2-t2v-a14b": lambda: build_wan22(True),
    "wan2.2-t2v-single": lambda: build_wan22(False),
}


def build_tiny_pipeline(name: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the tiny pipeline `name` (one of BUILDERS) to `folder` in diffusers format; returns folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline {name!r}; valid: {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    parts = BUILDERS[name]()
    cls = parts.pop("cls")
    for value in parts.values():
        if isinstance(value, torch.nn.Module):
            torch.nn.Module.to(value, dtype)
    pipe = cls(**parts)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


__all__ = ["BUILDERS", "build_tiny_pipeline", "byte_tokenizer"]
