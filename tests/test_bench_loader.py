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


def _jpeg(seed: int, size: int = 24) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_truncated_jpeg_is_skipped_and_counted_by_both_loaders(tmp_path, capsys):
    """Issue 14: the plain-webdataset baseline used to die with webdataset's DecodingError; both loaders
    now skip the bad sample, count it, and the table and JSON report the counts."""
    from conftest import write_tar

    members = []
    for i in range(8):
        data = _jpeg(i)
        members += [(f"k{i}.jpg", data[: len(data) // 2] if i == 3 else data), (f"k{i}.txt", f"cap {i}".encode())]
    shard = write_tar(tmp_path / "bad-000000.tar", members)
    out = tmp_path / "bench.json"
    assert cli_main(["bench-loader", "--shards", str(shard), "--resolution", "8", "--batch-size", "4",
                     "--workers", "0", "--seconds", "0.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| bad samples skipped |" in printed
    report = json.loads(out.read_text())
    for row in report["results"]:
        run = row["runs"][0]
        # one bad sample per pass over the 8; every pass is read whole, so at least one per 7 good ones
        assert run["bad_samples"] >= 1 and run["bad_samples"] >= (run["samples"] // 7) - 2, row["loader"]
        assert row["bad_samples"] == run["bad_samples"] and run["distinct_keys"] == 7
    assert {r["loader"] for r in report["results"]} == {"ours", "plain"}


def test_without_shards_the_tools_make_a_cached_shapes_set_once(tmp_path, monkeypatch, capsys):
    """No --shards and no data/shapes/ (before `make demo`): a shapes set is written once to the cache
    folder with a log line and reused; shards the user names but that do not exist are one-line errors."""
    import pytest

    from t2i.config import DataConfig
    from t2i.errors import DataError
    from tools import bench_data

    monkeypatch.chdir(tmp_path)  # no data/shapes here
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    default = DataConfig().shards
    logs = []
    spec, urls = bench_data.choose_shards(None, default, default=default, log=logs.append)
    assert len(logs) == 1 and "writing 1024 synthetic shapes samples" in logs[0] and "make demo" in logs[0]
    assert spec.startswith(str(tmp_path / "cache")) and len(urls) == bench_data.N_SHARDS
    assert bench_data.choose_shards(None, default, default=default, log=logs.append) == (spec, urls)
    assert len(logs) == 1  # reused, not rewritten
    with pytest.raises(DataError, match=r"^data.shards: 1 shard\(s\) not found: \['mine.tar'\]"):
        bench_data.choose_shards(None, "mine.tar", default=default)
    with pytest.raises(DataError, match=r"^--shards: the glob 'mine/\*.tar' matches nothing"):
        bench_data.choose_shards("mine/*.tar", default, default=default)
    # the command line: bench-loader reads the cached set; bench puts it in every variant's overrides
    assert cli_main(["bench-loader", "--loaders", "ours", "--workers", "0", "--seconds", "0.2",
                     "--resolution", "8", "--batch-size", "4"]) == 0
    assert "8 shards, resolution 8" in capsys.readouterr().out
    from types import SimpleNamespace

    from tools.bench import with_data
    args = SimpleNamespace(config=None, overrides=["train.steps=3"], shards=None)
    assert with_data(args) == ["train.steps=3", f'data.shards="{spec}"']
    args.shards = urls[0]
    assert with_data(args) == ["train.steps=3", f'data.shards="{urls[0]}"']


def test_bucketed_mode_reports_square_and_bucketed_rows(tmp_path, capsys):
    """--buckets: the square TrainLoader (ours) and the bucketed one side by side on a tiny mixed-aspect
    synthetic set (--synthetic-aspects, json width / height), with ratios, aspect drops and the buffers'
    memory (exact waiting bytes within the upper bound; waiting within the hard bound)."""
    import tarfile

    from PIL import Image

    from tools.bench_loader import write_synthetic_shards

    out = tmp_path / "bench.json"
    folder = tmp_path / "aspects"
    sizes = "64x48,48x64,64x64,100x40"  # 100x40 (2.5:1) is past max_aspect 2: dropped for its aspect
    assert cli_main(["bench-loader", "--synthetic-aspects", str(folder), "--synthetic-shape", "2x12",
                     "--synthetic-sizes", sizes, "--resolution", "32", "--buckets", "{step: 8}",
                     "--batch-size", "4", "--workers", "0,1", "--seconds", "0.3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "buckets {'step': 8}: 24x40, 32x32, 40x24" in printed
    assert "| ratio vs square (samples/s) |" in printed and "| bucketed | 1 |" in printed
    report = json.loads(out.read_text())
    assert report["bucket_sizes"] == ["24x40", "32x32", "40x24"] and report["buckets"] == {"step": 8}
    assert report["hard_bound_waiting_samples_per_slot"] == 3 * 3
    assert report["hard_bound_waiting_bytes_per_slot"] == 3 * 3 * (24 * 40 + 32 * 32 + 40 * 24)
    rows = {(r["loader"], r["workers"]): r for r in report["results"]}
    assert set(rows) == {("ours", 0), ("bucketed", 0), ("ours", 1), ("bucketed", 1)}
    for (loader, workers), r in rows.items():
        for field in ("samples_per_s", "cpu_ms_per_sample", "ratio_vs_square", "cpu_ratio_vs_square"):
            assert r[field] > 0, (loader, workers, field)
        assert r["ratio_vs_plain"] is None
        slots = max(1, workers)
        if loader == "ours":  # one buffer, emptied at every batch: nothing waits
            assert r["ratio_vs_square"] == 1.0 and r["aspect_dropped"] == 0
            assert r["peak_waiting_samples"] == 0 and r["peak_waiting_bytes"] == 0
            assert r["peak_slot_buffer_bytes"] == 4 * 32 * 32 * 3
            assert r["runs"][0]["image_shape"] == [3, 32, 32]
        else:
            assert r["aspect_dropped"] > 0 and r["bad_samples"] >= r["aspect_dropped"]
            assert 0 < r["peak_waiting_samples"] <= slots * report["hard_bound_waiting_samples_per_slot"]
            assert 24 * 40 * 3 * r["peak_waiting_samples"] <= r["peak_waiting_bytes"] \
                <= r["peak_waiting_bytes_upper_bound"] == r["peak_waiting_samples"] * 32 * 32 * 3
            assert r["peak_slot_buffer_bytes"] <= report["hard_bound_waiting_bytes_per_slot"] + 4 * 32 * 32 * 3
            assert set(r["runs"][0]["samples_per_bucket"]) <= set(report["bucket_sizes"])
    # the set: sizes cycled per shard, each with its json width / height; a rerun reuses it
    with tarfile.open(folder / "bench-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 64), (100, 40)] * 3):
        import io
        assert json.loads(members[f"b0_{i:05d}.json"]) == {"width": w, "height": h}
        assert Image.open(io.BytesIO(members[f"b0_{i:05d}.jpg"])).size == (w, h)
    stamp = (folder / "bench-manifest.json").stat().st_mtime_ns
    write_synthetic_shards(folder, 2, 12, sizes=[(64, 48), (48, 64), (64, 64), (100, 40)])
    assert (folder / "bench-manifest.json").stat().st_mtime_ns == stamp


def test_the_plain_synthetic_set_is_unchanged(tmp_path):
    """--synthetic (recorded benchmarks) still writes 640x480-style JPEGs without json, and its manifest."""
    import tarfile

    from tools.bench_loader import write_synthetic_shards

    write_synthetic_shards(tmp_path, n_shards=1, per_shard=2, width=20, height=15)
    assert json.loads((tmp_path / "bench-manifest.json").read_text()) == {
        "n_shards": 1, "per_shard": 2, "width": 20, "height": 15, "quality": 90, "seed": 0}
    with tarfile.open(tmp_path / "bench-000000.tar") as tar:
        assert sorted(m.name for m in tar.getmembers()) == ["b0_00000.jpg", "b0_00000.txt", "b0_00001.jpg",
                                                            "b0_00001.txt"]


def test_bucketed_loader_needs_buckets(make_shards, capsys):
    urls = make_shards(n_shards=1, per_shard=4)
    assert cli_main(["bench-loader", "--shards", urls[0], "--loaders", "ours,bucketed", "--workers", "0"]) != 0
    assert "--loaders bucketed needs --buckets" in capsys.readouterr().err
    assert cli_main(["bench-loader", "--shards", urls[0], "--buckets", "{stp: 64}", "--workers", "0"]) != 0
    assert "'--buckets.stp'" in capsys.readouterr().err
