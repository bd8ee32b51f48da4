"""A tiny, release-shaped Stable Diffusion 3.5 medium folder, built offline in a few seconds.

It has the release's file names and config keys (stabilityai/stable-diffusion-3.5-medium):

    model_index.json
    scheduler/scheduler_config.json        FlowMatchEulerDiscreteScheduler, shift 3.0
    text_encoder/   config.json model.safetensors           CLIP-L (CLIPTextModelWithProjection), fp16
    text_encoder_2/ config.json model.safetensors           bigG (CLIPTextModelWithProjection), fp16
    text_encoder_3/ config.json model.safetensors.index.json model-0000i-of-0000n.safetensors
                                                            T5 v1.1 encoder (gated-gelu), fp16, SHARDED
    tokenizer/ tokenizer_2/                 CLIPTokenizer (vocab.json, merges.txt; pad <|endoftext|> / "!")
    tokenizer_3/                            T5TokenizerFast (tokenizer.json)
    transformer/    config.json diffusion_pytorch_model.safetensors
                                            SD3Transformer2DModel with dual_attention_layers and qk_norm rms_norm
    vae/            config.json diffusion_pytorch_model.safetensors
                                            AutoencoderKL: 16 channels, 4 levels (factor 8), 1.5305 / 0.0609

Only the widths are tiny. Weights are random (seeded) and every component is stored in fp16 like
the release, so loading code must upcast. Resolution = transformer sample_size (8) x VAE factor (8)
= 64 px. The CLIP tokenizers use open_clip's bundled BPE (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE_SIZE = 8          # latent pixels (release: 128)
VAE_FACTOR = 8           # 4 VAE levels, as the release
RESOLUTION = SAMPLE_SIZE * VAE_FACTOR
T5_WIDTH = 32            # joint_attention_dim (release: 4096)
CLIP_L_PROJ, CLIP_G_PROJ = 12, 20  # pooled_projection_dim = 32 (release: 768 + 1280)
SCHEDULER_SHIFT = 3.0

# The release's model_index.json (component classes as published).
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.31.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
T5_WORDS = ("a photo of red blue green yellow purple orange circle square triangle cat dog two three "
            "left right above below and the").split()


def _clip(hidden: int, proj: int, act: str, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
        bos_token_id=49406, eos_token_id=eos, pad_token_id=1)).eval()


def _save_clip_tokenizer(tok, folder: Path) -> None:
    """As released: vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json (no tokenizer.json)."""
    from t2i.models.text_encoders import _bpe_vocab_merges

    tok.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    vocab, merges = _bpe_vocab_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n")


def build_sd35_folder(root: str | Path, seed: int = 0, scale: int = 1) -> Path:
    """Write the tiny SD3.5-medium-shaped folder into `root` (created) and return it.

    `scale` multiplies every width (CLIP, T5, transformer heads, VAE channels), so a test that measures
    memory can make the weights dominate the interpreter's own footprint; the shapes stay release-like."""
    w, v = scale, max(1, scale // 8)  # the release's VAE is small next to its transformer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from t2i.models.text_encoders import CLIP_G_PAD, CLIP_L_PAD, clip_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # CLIP-L: quick_gelu, legacy eos id 2 (argmax pooling, as the release's config); bigG: gelu.
        _clip(16 * w, CLIP_L_PROJ * w, "quick_gelu", 2).half().save_pretrained(root / "text_encoder")
        _clip(24 * w, CLIP_G_PROJ * w, "gelu", 49407).half().save_pretrained(root / "text_encoder_2")
        for sub, pad in (("tokenizer", CLIP_L_PAD), ("tokenizer_2", CLIP_G_PAD)):
            _save_clip_tokenizer(clip_tokenizer(pad), root / sub)

        tok3 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
                           + [("▁" + w, -5.0) for w in T5_WORDS] + [(c, -8.0) for c in T5_CHARS], extra_ids=0)
        tok3.save_pretrained(root / "tokenizer_3")
        t5 = T5EncoderModel(T5Config(  # T5 v1.1: gated-gelu, untied, no dropout at inference
            vocab_size=len(tok3), d_model=T5_WIDTH * w, d_kv=8 * w, d_ff=48 * w, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            is_encoder_decoder=False, use_cache=False)).eval()
        t5.half().save_pretrained(root / "text_encoder_3", max_shard_size=16_000 * w * w)

        SD3Transformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8 * w, num_attention_heads=2, joint_attention_dim=T5_WIDTH * w,
            caption_projection_dim=16 * w, pooled_projection_dim=(CLIP_L_PROJ + CLIP_G_PROJ) * w, pos_embed_max_size=16, qk_norm="rms_norm",
            dual_attention_layers=(0,)).half().save_pretrained(root / "transformer")
        AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8 * v, 8 * v, 16 * v, 16 * v], layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
            use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
            scaling_factor=1.5305, shift_factor=0.0609).half().save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return root
