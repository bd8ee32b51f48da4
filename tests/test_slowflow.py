"""Exposure-bias measurement: an exact model has no Slow Flow, a sluggish one does."""

import json

import numpy as np
import pytest
import torch

from t2i.eval.slowflow import markdown, measure, summarise, summary_table, write_report


class Oracle(torch.nn.Module):
    """The exact velocity towards one data point x*: v = (x − x*) / σ, scaled by `speed`."""

    def __init__(self, target: torch.Tensor, speed: float = 1.0):
        super().__init__()
        self.target, self.speed = target, speed
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, timestep, **kw):
        sigma = (timestep / 1000).view(-1, 1, 1, 1).clamp_min(1e-6)
        return (self.speed * (hidden_states - self.target) / sigma,)


class NoText:
    def encode(self, prompts):
        return torch.zeros(len(prompts), 2, 4), torch.zeros(len(prompts), 4)

    def encode_empty(self, n):
        return self.encode([""] * n)


def test_exact_velocity_has_no_exposure_bias():
    r = measure(Oracle(torch.full((3, 4, 4), 0.3)), NoText(), (3, 4, 4), ["p"] * 6, 8, guidance=1.0)
    assert r["sigma"] == pytest.approx([1 - i / 8 for i in range(9)])
    assert max(map(abs, r["mean_gap"])) < 1e-5 and max(map(abs, r["q90"])) < 1e-5


def test_a_sluggish_sampler_is_slower_than_its_steps():
    r = measure(Oracle(torch.full((3, 4, 4), 0.3), speed=0.8), NoText(), (3, 4, 4), ["p"] * 6, 4, guidance=1.0)
    gaps = r["mean_gap"]
    assert gaps[0] == pytest.approx(0.0, abs=1e-6) and gaps[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(g > 0.01 for g in gaps[1:-1])           # noisier than the step says: Slow Flow


def test_summary_quantiles_match_numpy(tmp_path):
    gaps = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    r = summarise(torch.linspace(1, 0, 5), gaps)
    assert r["q10"] == pytest.approx(np.quantile(gaps.numpy(), 0.1, axis=0).tolist(), abs=1e-6)
    assert r["mean_gap"] == pytest.approx(gaps.mean(0).tolist(), abs=1e-6) and r["n_images"] == 50
    results = {"a": {4: r}, "b": {4: r}}
    assert "| a | " in summary_table(results) and "| 4 | 0.000 |" in markdown(results)
    files = write_report(results, tmp_path)
    assert json.loads(files["json"].read_text())["a"]["4"]["n_images"] == 50 and files["png"].stat().st_size > 0
