"""Image features for FID/KID: the extractors, and features of an image set split over ranks.

Each extractor has `preprocess(HWC uint8) -> [3, S, S] float32 in [0, 255]`, `__call__([N, 3, S, S]) -> [N, D]`
and a `name` stored in reference files (t2i.eval.fid), so stats of different extractors are never compared.
`build_extractor(spec)` makes one:

* `inception:PATH` — clean-fid's "clean" mode (docs/design/evaluation.md §5.1): NVIDIA's TorchScript port of the
  TF FID Inception (`inception-2015-12-05.pt`) loaded from a local file, images resized to 299×299
  per channel with PIL bicubic on float32 (no quantisation), 2048-d pool features: clean-fid's default
  FID (published numbers also depend on N, the reference set and the mode, docs/design/evaluation.md §5.5). Nothing
  is ever downloaded: clean-fid itself would fetch the weights into /tmp; get the file as in §5.2.
* `random-conv` — a seeded, randomly initialised 4-layer conv net at 64×64, 256-d features, on CPU in
  exact integer arithmetic, so bit-identical across processes and batch sizes. For the synthetic shapes domain
  offline/on CPU: its FID numbers are **only comparable with other random-conv numbers** (same
  name), never with Inception FID or with any published figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from t2i.errors import EvalError
from t2i.eval.image_source import ImageSource
from t2i.io import file_sha256

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


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
        self.sha256 = file_sha256(path)
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

