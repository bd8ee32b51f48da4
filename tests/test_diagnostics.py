"""Diagnostics arithmetic against hand-computed cases."""

import io

import pytest
import torch
from PIL import Image

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

    out = val(Zero())
    assert len(val.groups) == 1  # no buckets: one group of all samples
    x, _, noise = val.groups[0]
    expected = [((noise[i] - x) ** 2).mean().item() for i in range(4)]
    assert out["val_loss_by_sigma"] == pytest.approx(expected, rel=1e-6)
    assert out["val_loss"] == pytest.approx(sum(expected) / 4, rel=1e-6)
    again = FixedSigmaValidation(vcfg, cfg.data, text, vae, torch.device("cpu"))
    assert torch.equal(again.groups[0][2], noise) and torch.equal(again.groups[0][0], x)   # comparable across runs


class Zero(torch.nn.Module):  # predicts v = 0, so the loss is E[(ε − x)²] at every σ
    def forward(self, hidden_states, **kw):
        return (torch.zeros_like(hidden_states),)


def test_fixed_sigma_validation_with_buckets_crops_each_sample_to_its_bucket(tmp_path):
    """Wide, tall and square held-out images land in the 40x24, 24x40 and 32x32 buckets, as in training; the
    loss is the mean over all samples of the per-sample losses (so buckets of unequal sizes weigh by sample)."""
    sizes = [(48, 32), (32, 48), (32, 32), (60, 36), (30, 30)]
    members = []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (40 * i, 10, 0)).save(buf, "PNG")
        members += [(f"k{i}.png", buf.getvalue()), (f"k{i}.txt", b"a photo of a red square")]
    shard = write_tar(tmp_path / "v.tar", members)
    cfg = load_config(overrides=["data.resolution=32", "data.buckets={step: 8}"])
    text, vae = build_frozen(cfg)
    vcfg = ValidationConfig(shards=str(shard), num_samples=5, num_sigmas=2, batch_size=2, seed=7)
    val = FixedSigmaValidation(vcfg, cfg.data, text, vae, torch.device("cpu"))
    shapes = [tuple(x.shape[2:]) for x, _, _ in val.groups]
    assert shapes == [(40, 24), (32, 32), (24, 40)]  # (height, width) of buckets 24x40, 32x32, 40x24
    assert val.keys == ["k1", "k2", "k4", "k0", "k3"]
    out = val(Zero())
    per_sample = [torch.cat([((noise[i] - x) ** 2).flatten(1).mean(1) for x, _, noise in val.groups]) for i in range(2)]
    assert out["val_loss_by_sigma"] == pytest.approx([float(v.mean()) for v in per_sample], rel=1e-6)
