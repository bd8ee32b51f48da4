"""Shared test setup: offline, CPU, quiet; small real tar shards written per test; the order in which
files run (longest first, so parallel workers finish together: docs/testing.md)."""

import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (make test: one per core) each get one intra-op thread, as torchrun gives each rank:
    # two workers with a thread per core each would oversubscribe the cores (OpenMP spins while it waits).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DURATIONS = Path(__file__).with_name("durations.json")  # seconds per test file, from a run (tools/test_times.py)


def file_cost(items: list) -> dict[str, float]:
    """Expected seconds per test file: the last recorded run's (tests/durations.json), else a guess from
    the marks (a `slow` test runs real processes, about half a minute; any other test about a second)."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    cost: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        guess = 30.0 if item.get_closest_marker("slow") else 1.0
        cost[path] = cost.get(path, 0.0) + (0.0 if path in known else guess)
    return {path: known.get(path, c) for path, c in cost.items()}


def pytest_collection_modifyitems(config, items):
    """Files longest first, each file's tests in their own order. `make test` hands whole files to its
    workers (pytest-xdist --dist loadfile, so module fixtures are built once) in this order: starting the
    longest files first lets the short ones fill in at the end (longest-processing-time scheduling)."""
    cost = file_cost(items)
    rank = {path: i for i, path in enumerate(sorted(cost, key=lambda p: -cost[p]))}
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: a file's own order is kept


def png_bytes(color, size=16) -> bytes:
    """A one-colour PNG of side `size`, or of (width, height) `size`."""
    buf = io.BytesIO()
    Image.new("RGB", size if isinstance(size, tuple) else (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar written with the standard library (independent of webdataset)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, color=(255, 0, 0), caption="a photo of a red square", image_ext="png"):
    members = [(f"{key}.{image_ext}", png_bytes(color))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return members


@pytest.fixture
def make_shards(tmp_path):
    """make_shards(n_shards, per_shard[, sizes]) -> list of shard paths with keys s{shard}_{i}."""
    def _make(n_shards=4, per_shard=10, prefix="shard", sizes=None):
        return write_sample_shards(tmp_path, n_shards, per_shard, prefix, sizes)
    return _make


def write_sample_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "shard",
                        sizes: list | None = None) -> list[str]:
    """Shards of single-colour 16 px images, keys s{shard}_{i}, captions "caption {shard} {i}". With `sizes`
    ((width, height) pairs), sample i is sizes[i % len(sizes)] and its json records width and height."""
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            rgb = tuple(int(v) for v in np.random.default_rng([s, i]).integers(0, 256, 3))
            key = f"s{s}_{i:03d}"
            members += sample_members(key, rgb, f"caption {s} {i}")
            if sizes:
                w, h = sizes[i % len(sizes)]
                members[-3] = (f"{key}.png", png_bytes(rgb, (w, h)))
                members[-1] = (f"{key}.json", json.dumps({"key": key, "width": w, "height": h}).encode())
        paths.append(str(write_tar(folder / f"{prefix}-{s:06d}.tar", members)))
    return paths


@pytest.fixture(scope="session")
def sd35_folder(tmp_path_factory):
    """A tiny, release-shaped SD3.5-medium diffusers folder (tests/sd35_fixture.py), built once per session."""
    from sd35_fixture import build_sd35_folder
    return build_sd35_folder(tmp_path_factory.mktemp("sd35") / "stable-diffusion-3.5-medium")
