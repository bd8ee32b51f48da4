"""Diagnostics arithmetic against hand-computed cases."""

import pytest
import torch

from conftest import sample_members, write_tar
from t2i.config import ValidationConfig
from t2i.train.diagnostics import FixedSigmaValidation, SigmaStats, bin_means, gap_summary
from t2i.models.build import build_frozen
from t2i.config import load_config


def test_loss_per_sigma_bin_is_the_mean_of_the_samples_in_each_bin():
    sigma = torch.tensor([0.05, 0.09, 0.5, 0.55, 1.0, 0.999])
    loss = torch.tensor([1.0, 3.0, 10.0, 20.0, 7.0, 9.0])
    assert bin_means(sigma, loss, 10) == [2.0, None, None, None, None, 15.0, None, None, None, 8.0]
    assert bin_means(sigma, loss, 2) == [2.0, (10 + 20 + 7 + 9) / 4]


def test_sigma_gap_summary_is_mean_and_quantiles_of_sigma_in_minus_sigma():
    sigma = torch.zeros(11)
    sigma_in = torch.arange(11) / 10          # gaps 0.0 .. 1.0
    g = gap_summary(sigma, sigma_in)
    assert g == pytest.approx({"mean": 0.5, "q10": 0.1, "q50": 0.5, "q90": 0.9})
    assert gap_summary(sigma_in, sigma_in) == {"mean": 0.0, "q10": 0.0, "q50": 0.0, "q90": 0.0}


def test_sigma_stats_accumulate_and_reset():
    stats = SigmaStats(bins=2)
    stats.add(torch.tensor([0.2, 0.7]), torch.tensor([0.3, 0.9]), torch.tensor([1.0, 2.0]))
    stats.add(torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([3.0]))
    s = stats.summary(torch.device("cpu"))
    assert s["loss_by_sigma"] == [2.0, 2.0] and s["sigma_gap"]["mean"] == pytest.approx(0.1)
    assert stats.parts == []


def test_fixed_sigma_validation_matches_a_direct_computation(tmp_path):
    shard = write_tar(tmp_path / "v.tar", sum((sample_members(f"k{i}", color=(20 * i, 0, 0)) for i in range(6)), []))
    cfg = load_config(overrides=["data.resolution=16"])
    text, vae = build_frozen(cfg)
    vcfg = ValidationConfig(shards=str(shard), num_samples=5, num_sigmas=4, batch_size=2, seed=7)
    val = FixedSigmaValidation(vcfg, cfg.data, text, vae, torch.device("cpu"))
    assert val.keys == [f"k{i}" for i in range(5)] and val.sigmas.tolist() == [0.125, 0.375, 0.625, 0.875]

    class Zero(torch.nn.Module):  # predicts v = 0, so the loss is E[(ε − x)²] at every σ
        def forward(self, hidden_states, **kw):
            return (torch.zeros_like(hidden_states),)

    out = val(Zero())
    expected = [((val.noise[i] - val.x) ** 2).mean().item() for i in range(4)]
    assert out["val_loss_by_sigma"] == pytest.approx(expected, rel=1e-6)
    assert out["val_loss"] == pytest.approx(sum(expected) / 4, rel=1e-6)
    again = FixedSigmaValidation(vcfg, cfg.data, text, vae, torch.device("cpu"))
    assert torch.equal(again.noise, val.noise) and torch.equal(again.x, val.x)   # comparable across runs
