"""MMDiT presets, local diffusers folders, gradient checkpointing; the frozen VAE."""

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from t2i.config import ModelConfig, VAEConfig
from t2i.errors import ConfigError
from t2i.models.mmdit import build_model, load_weights, preset_kwargs, velocity
from t2i.models.vae import FrozenVAE

TINY = dict(in_channels=3, sample_size=16, joint_attention_dim=64, pooled_projection_dim=64)


def n_params_on_meta(preset: str) -> int:
    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128,
                           joint_attention_dim=4096, pooled_projection_dim=2048)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,billions", [("sd3-medium", 2.03), ("sd3.5-medium", 2.24), ("sd3.5-large", 8.06)])
def test_release_presets_have_the_published_sizes(preset, billions):
    # Published transformer sizes: SD3 Medium 2B, SD3.5 Medium 2.5B (MMDiT-X incl. encoders' share), SD3.5 Large 8.1B.
    assert n_params_on_meta(preset) / 1e9 == pytest.approx(billions, rel=0.02)


def test_tiny_preset_is_deterministic_in_the_seed_and_predicts_the_latent_shape():
    a, b = build_model(ModelConfig(), seed=1, **TINY), build_model(ModelConfig(), seed=1, **TINY)
    c = build_model(ModelConfig(), seed=2, **TINY)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    x = torch.randn(2, 3, 16, 16)
    cond = {"context": torch.randn(2, 10, 64), "pooled": torch.randn(2, 64)}
    assert velocity(a, x, torch.tensor([250.0, 750.0]), cond).shape == x.shape


def test_pretrained_folder_loads_exactly_and_mismatched_widths_are_refused(tmp_path):
    model = build_model(ModelConfig(), seed=3, **TINY).eval()
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = build_model(ModelConfig(pretrained=str(tmp_path / "pipe")), **TINY).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500.0])
    cond = {"context": torch.randn(1, 5, 64), "pooled": torch.randn(1, 64)}
    assert torch.equal(velocity(model, x, t, cond), velocity(loaded, x, t, cond))
    with pytest.raises(ConfigError, match="joint_attention_dim: model has 64, pipeline needs 32"):
        build_model(ModelConfig(pretrained=str(tmp_path / "pipe")), **dict(TINY, joint_attention_dim=32))
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        build_model(ModelConfig(pretrained=str(tmp_path)), **TINY)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = build_model(ModelConfig(gradient_checkpointing=ckpt), seed=0, **TINY).train()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 16, 16, generator=gen)
        cond = {"context": torch.randn(2, 6, 64, generator=gen), "pooled": torch.randn(2, 64, generator=gen)}
        velocity(model, x, torch.tensor([100.0, 900.0]), cond).square().mean().backward()
        assert model.is_gradient_checkpointing == ckpt
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_load_weights_requires_every_parameter_but_not_buffers():
    model = build_model(ModelConfig(), **TINY)
    weights = {n: p.detach().clone() + 1 for n, p in model.named_parameters()}
    load_weights(model, weights)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    weights.pop(next(iter(weights)))
    with pytest.raises(KeyError, match="missing"):
        load_weights(model, weights)


def test_identity_vae_is_pixel_space():
    vae = FrozenVAE(VAEConfig(kind="identity"))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(vae.encode(x), x) and torch.equal(vae.decode(x), x)
    assert (vae.latent_channels, vae.latent_size(32)) == (3, 32)


def test_autoencoder_latents_use_sd3_scaling_and_shift(tmp_path):
    vae = FrozenVAE(VAEConfig(kind="tiny", latent_channels=16), seed=0)
    assert (vae.latent_channels, vae.latent_size(32), vae.training) == (16, 16, False)
    assert not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x, torch.Generator().manual_seed(0))
    raw = vae.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5305)
    torch.testing.assert_close(vae.decode(z), vae.vae.decode(raw).sample.clamp(-1, 1))
    vae.vae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = FrozenVAE(VAEConfig(kind="pretrained", path=str(tmp_path / "pipe")))
    assert isinstance(loaded.vae, AutoencoderKL)
    torch.testing.assert_close(loaded.encode(x, torch.Generator().manual_seed(0)), z)
    with pytest.raises(ConfigError, match="divisible"):
        vae.latent_size(33)


def test_from_scratch_presets_start_as_adaln_zero_blocks_predicting_zero():
    model = build_model(ModelConfig(), seed=0, **TINY)
    for name, module in model.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear")) or name in ("norm_out.linear", "proj_out"):
            assert not module.weight.any() and not module.bias.any(), name
    x = torch.randn(2, 3, 16, 16)
    cond = {"context": torch.randn(2, 6, 64), "pooled": torch.randn(2, 64)}
    assert not velocity(model, x, torch.tensor([10.0, 990.0]), cond).any()
    w = model.transformer_blocks[0].attn.to_q.weight
    bound = (6 / sum(w.shape)) ** 0.5                      # Xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
