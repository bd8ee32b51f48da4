"""FID and KID of a folder of generated images against saved reference statistics, fully offline.

    t2i fid ref --shards data/shapes-val --resolution 64 --out runs/ref/shapes-val.npz
    t2i fid score --images runs/toy/geneval --ref runs/ref/shapes-val.npz --out fid.json

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) over extractor features (clean-fid's `frechet_distance`,
Σ = np.cov(rowvar=False), i.e. the N−1 denominator, as clean-fid). KID = unbiased MMD² with the
polynomial kernel k(x, y) = (x·y/d + 1)³, averaged over `num_subsets` random subsets of
min(n₁, n₂, max_subset_size) images (clean-fid's `kernel_distance`, seeded here).

Feature extractors (`build_extractor(spec)`), each with a `name` stored in the reference file:

* `inception:PATH` — clean-fid's "clean" mode (docs/design/evaluation.md §5.1): NVIDIA's TorchScript port of the
  TF FID Inception (`inception-2015-12-05.pt`) loaded from a local file, images resized to 299×299
  per channel with PIL bicubic on float32 (no quantisation), 2048-d pool features: clean-fid's default
  FID (published numbers also depend on N, the reference set and the mode, docs/design/evaluation.md §5.5). Nothing
  is ever downloaded: clean-fid itself would fetch the weights into /tmp; get the file as in §5.2.
* `random-conv` — a seeded, randomly initialised 4-layer conv net at 64×64, 256-d features, on CPU in
  exact integer arithmetic, so bit-identical across processes and batch sizes. For the synthetic shapes domain
  offline/on CPU: its FID numbers are **only comparable with other random-conv numbers** (same
  name), never with Inception FID or with any published figure.

Stats from different extractors are refused (`EvalError`), not compared. FID is biased upwards at
small N and Σ is singular when N ≤ feature dim; `score_folder` says so in its "warnings" and
records N on both sides: compare FIDs only at the same N.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from t2i.errors import EvalError
from t2i.io import atomic_write

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
REF_FORMAT = "t2i-fid-ref/1"
MAX_PIXELS = 40_000_000  # larger images (by their header) are skipped and counted as bad, never decoded


class SmallSampleWarning(UserWarning):
    """Fewer images than feature dimensions: Σ is singular and FID is strongly biased."""


# ----------------------------------------------------------------------------------------------
# Feature extractors: preprocess(HWC uint8) -> [3, S, S] float32 in [0, 255]; __call__([N,3,S,S]) -> [N, D]
# ----------------------------------------------------------------------------------------------


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """HWC float32 -> CHW tensor, no scaling (what torchvision's ToTensor does for float32 input)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class InceptionExtractor:
    """clean-fid "clean" Inception features from a local TorchScript file (see module docstring)."""

    dim = 2048

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = Path(path)
        if not path.is_file():
            raise EvalError(
                f"Inception weights not found at {path}. Nothing is downloaded: fetch inception-2015-12-05.pt "
                f"from {INCEPTION_URL} on a machine with internet (docs/design/evaluation.md §5.2), copy it to this machine "
                f"and pass it as inception:/path/to/inception-2015-12-05.pt")
        self.path = path
        self.sha256 = _sha256(path)
        # The name pins the exact weights file, so stats from another file (or a test fake) are refused.
        self.name = f"inception-clean:{self.sha256[:12]}"
        self.spec = f"inception:{path}"
        # clean-fid's InceptionV3W(folder) joins a fixed file name to the folder and downloads it when missing
        # (features.feature_extractor even hard-codes /tmp), so its __init__ is skipped: the module gets the
        # attributes __init__ would set, from our local file, and keeps clean-fid's own forward() — the
        # (x - 128) / 128 normalisation, the 299×299 assert and `layers.forward(x).view(N, 2048)`.
        model = InceptionV3W.__new__(InceptionV3W)
        torch.nn.Module.__init__(model)
        with warnings.catch_warnings():  # recent torch marks TorchScript deprecated; the file *is* TorchScript
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*")
            try:
                model.base = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as exc:
                raise EvalError(f"could not load TorchScript Inception from {path} ({exc}); a truncated copy gives "
                               f"'PytorchStreamReader failed'; re-copy it from {INCEPTION_URL}") from exc
        model.layers = model.base.layers
        model.resize_inside = False
        self.model = model.eval()
        self.resize = build_resizer("clean")  # per-channel PIL bicubic on float32 to 299×299, clipped to [0, 255]
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device) -> InceptionExtractor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return _to_chw(self.resize(image))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # Full-precision convolutions: PyTorch lets cuDNN use TF32 by default on Ampere and later, which moved a
        # stand-in model's features by ~1e-4 (relative) against CPU on an H100. FID should not depend on the GPU.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return self.model(batch.to(self.device, torch.float32)).float().cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32


class RandomConvExtractor:
    """Seeded random conv net, 256-d features at 64×64, bit-identical across processes, batch sizes and threads.

    conv3×3(3→32)-ReLU-avgpool2 → (32→64)-ReLU-avgpool2 → (64→128)-ReLU-avgpool2 → (128→256)-ReLU → mean over
    space. A float32 net is *not* bit-deterministic on CPU (measured: oneDNN results change with the batch size and
    the thread count), so this one is integer arithmetic carried in float64: pixels − 128 rounded to integers,
    integer weights (He-normal × 2⁵ from numpy's PCG64 seeded with `seed`, rounded) and biases, and after each
    pooled layer floor(·/2⁵). Every partial sum is then an integer below 2⁵³ (checked in __init__), so any
    summation order gives the same exact result. Runs on CPU only. Images of another size are resized to 64×64
    with clean-fid's float PIL bicubic first. Changing anything here changes the numbers: bump the version in `name`.
    """

    dim = 256
    widths = (3, 32, 64, 128, 256)
    scale_bits = 5

    def __init__(self, seed: int = 0, resolution: int = 64):
        self.seed, self.resolution = seed, resolution
        self.name = f"random-conv-v1:seed={seed}:res={resolution}"
        self.spec = "random-conv" if (seed, resolution) == (0, 64) else f"random-conv:{seed}:{resolution}"
        rng = np.random.default_rng(seed)
        self.weights = []
        bound = 128.0  # largest |activation| entering the next layer
        for c_in, c_out in zip(self.widths[:-1], self.widths[1:]):
            w = np.rint(rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9)) * 2**self.scale_bits)
            b = np.rint(rng.standard_normal(c_out) * 2**self.scale_bits)
            bound = bound * np.abs(w).sum(axis=(1, 2, 3)).max() + np.abs(b).max()
            assert bound * 4 < 2**53, "random-conv partial sums would leave float64's exact integer range"
            bound /= 2**self.scale_bits
            self.weights.append((torch.from_numpy(w), torch.from_numpy(b)))
        from cleanfid.resize import make_resizer
        self.resize = make_resizer("PIL", False, "bicubic", (resolution, resolution))

    def to(self, device) -> RandomConvExtractor:
        return self  # deliberately CPU-only (GPU convolutions may pick inexact algorithms such as FFT)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        if image.shape[:2] != (self.resolution, self.resolution):
            return _to_chw(self.resize(image))
        return _to_chw(image.astype(np.float32))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = torch.round(batch.detach().to("cpu", torch.float64)) - 128.0
        for i, (w, b) in enumerate(self.weights):
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if i < len(self.weights) - 1:  # avg of 4 integers, then floor(·/2⁵): exact
                x = torch.floor(F.avg_pool2d(x, 2) / 2**self.scale_bits)
        # mean = sum of 64 integers / 2⁶, and / 2¹⁰ to bring features to Inception's O(1) scale: both exact
        return (x.mean(dim=(2, 3)) / 2**10).float()


Extractor = InceptionExtractor | RandomConvExtractor


def build_extractor(spec: str, device: str | torch.device = "cpu") -> Extractor:
    """`random-conv`, `random-conv:SEED:RES` or `inception:PATH` -> an extractor."""
    if spec.startswith("inception:"):
        return InceptionExtractor(spec[len("inception:"):], device)
    if spec == "random-conv" or spec.startswith("random-conv:"):
        parts = spec.split(":")[1:]
        try:
            seed, res = (int(parts[0]) if parts else 0), (int(parts[1]) if len(parts) > 1 else 64)
        except ValueError:
            raise EvalError(f"bad extractor {spec!r}: expected random-conv[:SEED[:RES]]") from None
        return RandomConvExtractor(seed, res)
    raise EvalError(f"unknown extractor {spec!r}: use random-conv or inception:/path/to/inception-2015-12-05.pt")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """RGB uint8 HWC images from a folder (recursive, sorted paths) or shards (shard order, tar order).

    Shard images are short-side resized and centre-cropped to `resolution` as training sees them
    (`resize_center_crop`); folder images only when `resolution` is given. `max_images` keeps the first N
    *entries* (files / tar samples); bad ones among them are skipped and counted in `counts`, so a rank of a
    distributed run can take its strided share without decoding the others.
    """

    folder: str | None = None
    shards: str | list | None = None
    resolution: int | None = None
    max_images: int | None = None
    counts: dict = field(default_factory=lambda: {"good": 0, "image": 0, "read": 0})
    key: str = "--shards"           # the flag (or key) that gave `shards`, named in its errors

    def __post_init__(self):
        if (self.folder is None) == (self.shards is None):
            raise ValueError("ImageSource needs exactly one of folder= or shards=")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.folder is not None and not Path(self.folder).is_dir():
            raise EvalError(f"image folder not found: {self.folder}")
        if self.shards is not None and self.resolution is None:
            raise ValueError("a shard source needs resolution= (images are centre-cropped to it)")
        if self.shards is not None:  # a wrong spec fails here, naming its flag, before any extractor is built
            from t2i.data.shards import expand_shards
            expand_shards(self.shards, key=self.key)

    def describe(self) -> str:
        if self.folder is not None:
            return f"folder:{os.path.abspath(self.folder)}"
        return f"shards:{self.shards if isinstance(self.shards, str) else '::'.join(map(str, self.shards))}"

    def identity(self) -> str:
        """What the source resolves to, independent of how it was spelled: the folder's absolute path,
        or a digest of the expanded shard list (absolute paths) and its length."""
        if self.folder is not None:
            return f"folder:{os.path.abspath(self.folder)}"
        from t2i.data.shards import expand_shards

        urls = [u if (u.startswith("pipe:") or "://" in u) else os.path.abspath(u)
                for u in expand_shards(self.shards, key=self.key)]
        return f"shards:{len(urls)}:{hashlib.sha256(chr(10).join(urls).encode()).hexdigest()[:16]}"

    def files(self) -> list[Path]:
        files = sorted(p for p in Path(self.folder).rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
        return files[: self.max_images]

    def _entries(self) -> Iterator[Path | dict]:
        if self.folder is not None:
            yield from self.files()
            return
        from t2i.data.shards import expand_shards, manifest_counts, raw_samples

        urls = expand_shards(self.shards, key=self.key)
        samples = raw_samples(urls, self.counts, manifest_counts(urls))  # a damaged shard counts once
        for i, sample in enumerate(samples):
            if self.max_images is not None and i >= self.max_images:
                break
            yield sample

    def _decode(self, entry: Path | dict) -> np.ndarray | None:
        # t2i.data.loader imports t2i.config and with it open_clip/transformers (~3 s): only when needed
        from t2i.data.decode import IMAGE_KEYS, resize_center_crop

        try:
            if isinstance(entry, dict):
                key = next((k for k in IMAGE_KEYS if k in entry), None)
                if key is None:
                    return None
                opened = Image.open(io.BytesIO(entry[key]))
            else:
                opened = Image.open(entry)
            with opened as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:  # from the header: never decoded
                    return None
                im.load()
                image = im.convert("RGB")
            if self.resolution is not None:
                image = resize_center_crop(image, self.resolution)
            return np.asarray(image, dtype=np.uint8)
        except Exception:  # noqa: BLE001 - any decoder failure is a bad sample, counted, not a crash
            return None

    def iter_indexed(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(entry index, image) for the entries with index % world == rank; only those are decoded."""
        self.counts = {"good": 0, "image": 0, "read": 0}
        for i, entry in enumerate(self._entries()):
            if i % world != rank:
                continue
            image = self._decode(entry)
            if image is None:
                self.counts["image"] += 1
                continue
            self.counts["good"] += 1
            yield i, image

    def __iter__(self) -> Iterator[np.ndarray]:
        return (image for _, image in self.iter_indexed())

    def size_hint(self) -> int | None:
        return len(self.files()) if self.folder is not None else self.max_images


# ----------------------------------------------------------------------------------------------
# Features (optionally split over torch.distributed ranks)
# ----------------------------------------------------------------------------------------------


def _as_uint8_hwc(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(image)


def compute_features(images: ImageSource | Iterable, extractor: Extractor, batch_size: int = 64,
                     device: str | torch.device | None = None, progress: bool = True,
                     desc: str = "features") -> np.ndarray:
    """[N, D] float32 features of `images` (an ImageSource, or HWC uint8 arrays / PIL images), in order.

    Under torch.distributed each rank extracts every world-th image and the features are all-gathered
    back into the single-process order (bit-identical for random-conv; GPU models may differ in the last
    float bits because batches are composed differently). With NCCL, call torch.cuda.set_device first.
    """
    if device is not None:
        extractor.to(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if isinstance(images, ImageSource):
        indexed, total = images.iter_indexed(rank, world), images.size_hint()
    else:
        indexed = ((i, im) for i, im in enumerate(images) if i % world == rank)
        total = len(images) if hasattr(images, "__len__") else None
    total = None if total is None else (total - rank + world - 1) // world
    index, chunks, batch = [], [], []
    for i, image in tqdm(indexed, total=total, desc=desc, unit="img", disable=not progress or rank != 0):
        index.append(i)
        batch.append(extractor.preprocess(_as_uint8_hwc(image)))
        if len(batch) == batch_size:
            chunks.append(extractor(torch.stack(batch)).numpy())
            batch = []
    if batch:
        chunks.append(extractor(torch.stack(batch)).numpy())
    feats = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, extractor.dim), np.float32)
    if world > 1:
        index, feats = _all_gather_rows(np.asarray(index, np.int64), feats)
        feats = feats[np.argsort(index, kind="stable")]
        if isinstance(images, ImageSource):
            images.counts = _merge_counts(images.counts)
    return feats


def _all_gather_rows(index: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (index, feature rows), padding to the longest share for all_gather."""
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(index)], dtype=torch.int64, device=comm))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    rows = torch.zeros(longest, feats.shape[1], dtype=torch.float32, device=comm)
    rows[: len(feats)] = torch.from_numpy(feats)
    idx = torch.full((longest,), -1, dtype=torch.int64, device=comm)
    idx[: len(index)] = torch.from_numpy(index)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_idx, idx)
    index = np.concatenate([t[:n].cpu().numpy() for t, n in zip(all_idx, sizes)])
    feats = np.concatenate([t[:n].cpu().numpy() for t, n in zip(all_rows, sizes)])
    return index, feats


def _merge_counts(counts: dict) -> dict:
    """Decode outcomes summed over ranks; tar read errors are seen by every rank (all read all shards)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    return {"good": sum(c["good"] for c in gathered), "image": sum(c["image"] for c in gathered),
            "read": max(c["read"] for c in gathered)}


# ----------------------------------------------------------------------------------------------
# Reference statistics (npz)
# ----------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """μ, Σ (float64) and optionally the features (for KID) of one image set, with its meta."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict | None = None) -> Stats:
        feats = np.asarray(feats)
        if feats.ndim != 2 or len(feats) < 2:
            raise EvalError(f"need at least 2 images for a covariance, got features of shape {feats.shape}")
        f64 = feats.astype(np.float64)
        return cls(f64.mean(axis=0), np.cov(f64, rowvar=False), feats, dict(meta or {}))

    @property
    def n(self) -> int:
        return int(self.meta.get("n", len(self.feats) if self.feats is not None else 0))

    @property
    def extractor(self) -> str | None:
        return self.meta.get("extractor")


def save_reference(path: str | Path, feats: np.ndarray, meta: dict) -> Stats:
    """Write mu, sigma, feats and meta (JSON) to `path` atomically; meta must name the "extractor"."""
    if "extractor" not in meta:
        raise ValueError("reference meta must name the extractor (meta['extractor'])")
    stats = Stats.from_features(feats, meta)
    stats.meta = {"format": REF_FORMAT, **meta, "n": len(feats), "dim": int(np.shape(feats)[1]),
                  "created": meta.get("created") or datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds")}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, mu=stats.mu, sigma=stats.sigma, feats=stats.feats, meta=np.array(json.dumps(stats.meta)))

    atomic_write(path, write)  # a unique temp name per writer, renamed over `path`
    return stats


def load_reference(path: str | Path, extractor: Extractor | str | None = None) -> Stats:
    """Stats from `save_reference`; with `extractor` (object or name), refuse stats made by another one."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics not found: {path} (make them with `t2i fid ref ...`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "meta" not in data.files:
                raise EvalError(f"{path} has no meta (not written by t2i.eval.fid.save_reference), so its extractor "
                                f"is unknown")
            stats = Stats(data["mu"], data["sigma"], data["feats"] if "feats" in data.files else None,
                          json.loads(str(data["meta"])))
    except EvalError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise EvalError(f"{path} is not a readable reference .npz ({type(exc).__name__}: {exc}); rebuild it with "
                        f"`t2i fid ref`") from None
    if extractor is not None:
        check_extractor(stats, extractor, where=str(path))
    return stats


def reference_provenance(source: ImageSource, extractor: Extractor | str) -> dict:
    """What a reference is built from, as recorded in its meta and compared by `reference_differences`."""
    return {"source": source.describe(), "source_id": source.identity(), "max_images": source.max_images,
            "resolution": source.resolution,
            "extractor": extractor if isinstance(extractor, str) else extractor.name}


def reference_differences(meta: dict, wanted: dict) -> list[str]:
    """'field: recorded X, requested Y' for each provenance field of `wanted` (see `reference_provenance`)
    that the reference's meta contradicts. The source is compared by `source_id` when both have one
    (so `data/x` and `/abs/data/x` are the same source), else by its spelling."""
    diffs = []
    if meta.get("source_id") and wanted.get("source_id"):
        same = meta["source_id"] == wanted["source_id"]
    else:
        same = meta.get("source") == wanted.get("source")
    if not same:
        diffs.append(f"source: recorded {meta.get('source')!r}, requested {wanted.get('source')!r}")
    for key, label in (("max_images", "max images"), ("resolution", "resolution"), ("extractor", "extractor")):
        if meta.get(key) != wanted.get(key):
            diffs.append(f"{label}: recorded {meta.get(key)!r}, requested {wanted.get(key)!r}")
    return diffs


def _res(r) -> str:
    return "native size (not cropped)" if r is None else f"{r} px"


def check_resolution(meta: dict, resolution: int | None, where: str = "reference", allow: bool = False,
                     flag: str = "--allow-resolution-mismatch") -> list[str]:
    """Refuse (EvalError) images brought to `resolution` against a reference made at another one, naming
    both; with `allow`, return the mismatch as a warning note instead. [] when they agree."""
    ref_res = meta.get("resolution")
    if resolution == ref_res:
        return []
    message = (f"images at {_res(resolution)} but {where} was made at {_res(ref_res)}: the crop and scale differ, "
               f"so FID would measure the resolution, not the model")
    if not allow:
        raise EvalError(f"{message}; score at the reference's resolution, rebuild the reference at {_res(resolution)}, "
                        f"or pass {flag}")
    return [f"resolution mismatch allowed ({flag}): {message}"]


def check_extractor(stats: Stats, extractor: Extractor | str, where: str = "reference") -> None:
    name = extractor if isinstance(extractor, str) else extractor.name
    if stats.extractor != name:
        raise EvalError(f"{where} was made with extractor {stats.extractor!r}, not {name!r}: features of different "
                       f"extractors are not comparable; rebuild the reference with the same --extractor")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _as_stats(x: Stats | np.ndarray) -> Stats:
    return x if isinstance(x, Stats) else Stats.from_features(x)


def sample_notes(n_a: int, n_b: int, dim: int) -> list[str]:
    """Caveats worth printing next to an FID computed from n_a and n_b images of `dim`-d features."""
    notes = []
    if min(n_a, n_b) <= dim:
        notes.append(f"only {min(n_a, n_b)} images for {dim}-d features: the covariance is singular, so FID is "
                     f"strongly biased upwards and ill-conditioned; compare only FIDs computed at the same N")
    return notes


def fid(a: Stats | np.ndarray, b: Stats | np.ndarray) -> float:
    """Fréchet distance between two feature sets or Stats (clean-fid's `frechet_distance`)."""
    # cleanfid.fid imports torchvision (~3 s), so only when needed
    from cleanfid.fid import frechet_distance

    a, b = _as_stats(a), _as_stats(b)
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise EvalError(f"cannot compare features of {a.extractor!r} with features of {b.extractor!r}")
    if a.mu.shape != b.mu.shape:
        raise EvalError(f"feature dims differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    for note in sample_notes(a.n, b.n, a.mu.shape[0]):
        warnings.warn(note, SmallSampleWarning, stacklevel=2)
    with warnings.catch_warnings():
        # clean-fid calls scipy.linalg.sqrtm(..., disp=False): deprecated in SciPy 1.16 (silenced here, that
        # message only) and removed in 1.18, where it raises TypeError: then the same formula without `disp`.
        warnings.filterwarnings("ignore", message=r".*`disp` argument is deprecated.*", category=DeprecationWarning)
        try:
            try:
                return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
            except TypeError as exc:
                if "disp" not in str(exc):
                    raise
                return _frechet_distance_scipy118(a.mu, a.sigma, b.mu, b.sigma)
        except ValueError as exc:  # clean-fid: "Imaginary component ..." from sqrtm of a near-singular product
            raise EvalError(f"FID is numerically undefined for these sets ({exc}); with {min(a.n, b.n)} images for "
                           f"{a.mu.shape[0]}-d features the covariances are singular: use more images") from exc


def _frechet_distance_scipy118(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """clean-fid 0.1.35's `frechet_distance` line for line, with SciPy >= 1.18's `sqrtm` (no `disp`, one return)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(a: Stats | np.ndarray, b: Stats | np.ndarray, num_subsets: int = 100,
        max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (clean-fid's `kernel_distance`), deterministic: its unseeded np.random draws run on a seeded,
    then restored, global numpy state. Computed in float64."""
    from cleanfid.fid import kernel_distance

    feats = []
    for x in (a, b):
        if isinstance(x, Stats):
            if x.feats is None:
                raise EvalError("KID needs the reference features; these stats hold only mu/sigma")
            x = x.feats
        feats.append(np.asarray(x, dtype=np.float64))
    if min(len(f) for f in feats) < 2:
        raise EvalError(f"KID needs at least 2 images on each side, got {len(feats[0])} and {len(feats[1])}")
    if feats[0].shape[1] != feats[1].shape[1]:
        raise EvalError(f"feature dims differ: {feats[0].shape[1]} vs {feats[1].shape[1]}")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return kernel_distance(feats[0], feats[1], num_subsets=num_subsets, max_subset_size=max_subset_size)
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def make_reference(source: ImageSource, extractor: Extractor, out: str | Path, batch_size: int = 64,
                   device=None, progress: bool = True) -> Stats:
    """Features of `source` -> reference npz at `out` (meta: extractor, spec, n, source, resolution, bad counts)."""
    feats = compute_features(source, extractor, batch_size, device, progress, desc="reference")
    if len(feats) < 2:
        raise EvalError(f"{source.describe()} gave {len(feats)} usable images (bad: {source.counts}); need >= 2")
    meta = {**reference_provenance(source, extractor), "spec": extractor.spec, "counts": dict(source.counts)}
    return save_reference(out, feats, meta)


def score_folder(images_dir: str | Path, reference_path: str | Path,
                 extractor: Extractor | str | None = None, batch_size: int = 64, device=None,
                 resolution: int | None = None, max_images: int | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, progress: bool = True,
                 allow_resolution_mismatch: bool = False) -> dict:
    """FID/KID of the images under `images_dir` (recursive) against a saved reference.

    `extractor` defaults to the one recorded in the reference ("spec"); a different one is refused.
    `resolution` defaults to the reference's, so both sides are centre-cropped to the same size before
    the extractor's own resize; another resolution is refused unless `allow_resolution_mismatch`
    (then the mismatch is in "warnings").
    """
    if max_images is not None and max_images < 1:
        raise EvalError(f"--max must be >= 1, got {max_images}")
    ref = load_reference(reference_path)
    mismatch = [] if resolution is None else check_resolution(ref.meta, resolution, f"reference {reference_path}",
                                                              allow_resolution_mismatch)
    if extractor is None:
        extractor = ref.meta.get("spec")
        if extractor is None:
            raise EvalError(f"{reference_path} records no extractor spec; pass the extractor explicitly")
    if isinstance(extractor, str):
        extractor = build_extractor(extractor, device or "cpu")
    check_extractor(ref, extractor, where=str(reference_path))
    resolution = resolution if resolution is not None else ref.meta.get("resolution")
    source = ImageSource(folder=str(images_dir), resolution=resolution, max_images=max_images)
    feats = compute_features(source, extractor, batch_size, device, progress, desc="images")
    if len(feats) < 2:
        raise EvalError(f"{images_dir} holds {len(feats)} usable images (bad: {source.counts}); need >= 2")
    gen = Stats.from_features(feats, {"extractor": extractor.name})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # reported in "warnings" below instead
        value = fid(gen, ref)
    kid_value = None
    if ref.feats is not None:
        kid_value = kid(feats, ref.feats, num_subsets=kid_subsets, max_subset_size=kid_subset_size, seed=seed)
    notes = mismatch + sample_notes(len(feats), ref.n, extractor.dim)
    if ref.feats is None:
        notes.append("reference holds no features: KID not computed")
    if extractor.name.startswith("random-conv"):
        notes.append("random-conv features: comparable only with other random-conv numbers, not with Inception FID")
    return {"fid": value, "kid": kid_value, "n_images": len(feats), "n_reference": ref.n,
            "extractor": extractor.name, "resolution": resolution, "images": os.path.abspath(images_dir),
            "bad_images": source.counts["image"], "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
            "kid_seed": seed, "warnings": notes, "reference": {"path": os.path.abspath(reference_path), **ref.meta}}

