"""Shared test setup: offline, CPU, quiet; small real tar shards written per test."""

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def png_bytes(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
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
    """make_shards(n_shards, per_shard) -> list of shard paths with keys s{shard}_{i}."""
    def _make(n_shards=4, per_shard=10, prefix="shard"):
        return write_sample_shards(tmp_path, n_shards, per_shard, prefix)
    return _make


def write_sample_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "shard") -> list[str]:
    """Shards of single-colour images, keys s{shard}_{i}, captions "caption {shard} {i}"."""
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            rgb = tuple(int(v) for v in np.random.default_rng([s, i]).integers(0, 256, 3))
            members += sample_members(f"s{s}_{i:03d}", rgb, f"caption {s} {i}")
        paths.append(str(write_tar(folder / f"{prefix}-{s:06d}.tar", members)))
    return paths


@pytest.fixture(scope="session")
def sd35_folder(tmp_path_factory):
    """A tiny, release-shaped SD3.5-medium diffusers folder (tests/sd35_fixture.py), built once per session."""
    from sd35_fixture import build_sd35_folder
    return build_sd35_folder(tmp_path_factory.mktemp("sd35") / "stable-diffusion-3.5-medium")
