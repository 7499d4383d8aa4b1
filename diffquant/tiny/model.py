"""Untrained components of the embedded tiny FLUX pipeline (architecture only; training lives in
scripts/train_tiny_model.py). Everything is built offline: the tokenizers are word-level over the
caption vocabulary of `diffquant.tiny.shapes`, so no hub download is ever needed."""

from __future__ import annotations

import torch

from diffquant.tiny import shapes

TEXT_LEN = 16  # tokens per prompt for both text encoders (captions have at most 12 words)
SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = sorted({"a", "an", "in", "the", "at", "on", "background", *shapes.COLORS, *shapes.SHAPES,
                *shapes.POSITIONS, *shapes.SIZES})


def tokenizer():
    """Word-level tokenizer: lower-cased words of the caption vocabulary, '</s>' appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)


def components(seed: int = 0) -> dict:
    """FluxPipeline components with fresh weights (float32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(WORDS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TEXT_LEN, projection_dim=64, pad_token_id=0, eos_token_id=1, bos_token_id=1))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=shapes.IMAGE_SIZE)  # 64x64 -> 16x16x4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
        guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer(), text_encoder_2=t5,
                tokenizer_2=tokenizer(), transformer=transformer, image_encoder=None, feature_extractor=None)
