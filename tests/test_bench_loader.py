"""tools/bench_loader.py: a short run on two tiny shards gives a complete report, and both loaders did
the same work (the same keys, shapes, value range and, for a shared key, the same pixels)."""

import json

import torch

from t2i.cli import main as cli_main
from tools.bench_loader import ours_loader, plain_loader


def test_bench_loader_reports_rates_for_both_loaders(make_shards, tmp_path):
    urls = make_shards(n_shards=2, per_shard=10)
    out = tmp_path / "bench.json"
    rc = cli_main(["bench-loader", "--shards", "::".join(urls), "--resolution", "8", "--batch-size", "4",
                   "--workers", "0,1", "--seconds", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["resolution"] == 8 and report["batch_size"] == 4 and len(report["shards"]) == 2
    rows = {(r["loader"], r["workers"]): r for r in report["results"]}
    assert set(rows) == {("ours", 0), ("plain", 0), ("ours", 1), ("plain", 1)}
    for (loader, workers), r in rows.items():
        for field in ("samples_per_s", "min_samples_per_s", "max_samples_per_s", "per_worker_samples_per_s",
                      "ratio_vs_plain", "cpu_ms_per_sample"):
            assert r[field] > 0, (loader, workers, field)
        run = r["runs"][0]
        assert run["samples"] > 0 and run["seconds"] >= 1
        assert run["distinct_keys"] == 20                      # a second at >= 20 samples/s covers the epoch
        assert run["image_shape"] == [3, 8, 8]
        assert -1.0 <= run["min"] <= run["max"] <= 1.0
    assert rows[("plain", 0)]["ratio_vs_plain"] == 1.0


def test_both_loaders_make_the_same_tensors(make_shards):
    urls = make_shards(n_shards=2, per_shard=6)
    ours, plain = {}, {}
    for loader, dest in ((iter(ours_loader(urls, 8, 4, 0)), ours), (plain_loader(urls, 8, 4, 0), plain)):
        for _ in range(3):
            batch = next(loader)
            dest.update(zip(batch["keys"], batch["images"]))
    assert set(ours) == set(plain) and len(ours) == 12
    for key in ours:
        assert torch.equal(ours[key], plain[key]), key
