"""The MMDiT presets (`model.preset`): plain data, read by t2i.models.mmdit to build a model and by
t2i.models.geometry to check a config before anything heavy is imported."""

# Shapes of the released checkpoints' transformer/config.json (sample_size is in latent pixels).
PRESETS: dict[str, dict] = {
    # CPU-sized: 4 blocks of width 128 over 4x4-pixel patches (64 tokens at 32 px), SD3.5's QK-norm;
    # its position table is exactly the latent grid (set in preset_kwargs) so neighbours are 1 apart.
    "tiny": dict(patch_size=4, num_layers=4, attention_head_dim=32, num_attention_heads=4,
                 caption_projection_dim=128, qk_norm="rms_norm"),
    "sd3-medium": dict(patch_size=2, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                       caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(patch_size=2, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                         caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(patch_size=2, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                        caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"),
}
