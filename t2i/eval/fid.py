"""FID and KID of a folder of generated images against saved reference statistics, fully offline.

    t2i fid ref --shards data/shapes-val --resolution 64 --out runs/ref/shapes-val.npz
    t2i fid score --images runs/toy/geneval --ref runs/ref/shapes-val.npz --out fid.json

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) over extractor features (clean-fid's `frechet_distance`,
Σ = np.cov(rowvar=False), i.e. the N−1 denominator, as clean-fid). KID = unbiased MMD² with the
polynomial kernel k(x, y) = (x·y/d + 1)³, averaged over `num_subsets` random subsets of
min(n₁, n₂, max_subset_size) images (clean-fid's `kernel_distance`, seeded here).

Features come from an extractor (t2i.eval.features: `random-conv` or `inception:PATH`) whose name is
stored in the reference file; images from an ImageSource (t2i.eval.image_source). Stats from different extractors are refused (`EvalError`), not compared. FID is biased upwards at
small N and Σ is singular when N ≤ feature dim; `score_folder` says so in its "warnings" and
records N on both sides: compare FIDs only at the same N.

Sizes: a reference is made at a resolution (an int side: short-side resize + centre crop; "WxH": cover
resize + centre crop to width x height; None: native size) and images are scored only at the same size,
compared as (width, height): 64 and (64, 64) agree, 1216x832 and 1024 do not (`check_resolution`;
docs/design/evaluation.md §5.7). Both extractors then resize every image to their square input
(299² / 64²) without keeping its aspect, so only same-size sets are squashed alike.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2i.errors import EvalError
from t2i.eval.features import Extractor, build_extractor, compute_features
from t2i.eval.image_source import ImageSource, as_resolution, describe_resolution, resolution_record, size_of
from t2i.io import atomic_write

REF_FORMAT = "t2i-fid-ref/1"


class SmallSampleWarning(UserWarning):
    """Fewer images than feature dimensions: Σ is singular and FID is strongly biased."""



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
            "resolution": resolution_record(source.resolution),
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
        same = (same_size(meta.get(key), wanted.get(key)) if key == "resolution"
                else meta.get(key) == wanted.get(key))
        if not same:
            diffs.append(f"{label}: recorded {meta.get(key)!r}, requested {wanted.get(key)!r}")
    return diffs


def reference_size(meta: dict) -> tuple[int, int] | None:
    """The (width, height) a reference was made at, or None (native size, not cropped). Reads every meta:
    an int "resolution" (a square; every reference made before non-square sizes), "WxH", or [w, h]."""
    r = meta.get("resolution")
    return None if r is None else size_of(r)


def same_size(a, b) -> bool:
    """Two resolutions (int side, (w, h), "WxH", or None for native) name the same size."""
    return (a is None) == (b is None) and (a is None or size_of(a) == size_of(b))


def check_resolution(meta: dict, resolution, where: str = "reference", allow: bool = False,
                     flag: str = "--allow-resolution-mismatch") -> list[str]:
    """Refuse (EvalError) images brought to `resolution` (an int side, (width, height), "WxH" or None for
    native) against a reference made at another size, naming both; with `allow`, return the mismatch as a
    warning note instead. [] when they agree. Sizes are compared as (width, height): 64 equals (64, 64);
    samples at 1216x832 against a reference at 1024 (or at 832x1216) are a mismatch."""
    ref_res = meta.get("resolution")
    if same_size(resolution, ref_res):
        return []
    _res = describe_resolution
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
                 resolution=None, max_images: int | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, progress: bool = True,
                 allow_resolution_mismatch: bool = False) -> dict:
    """FID/KID of the images under `images_dir` (recursive) against a saved reference.

    `extractor` defaults to the one recorded in the reference ("spec"); a different one is refused.
    `resolution` (an int side, (width, height) or "WxH") defaults to the reference's, so both sides are
    cropped to the same size before the extractor's own (aspect-squashing) resize; another size is refused
    unless `allow_resolution_mismatch` (then the mismatch is in "warnings"). "resolution" in the result is
    an int for a square and "WxH" otherwise, with "width" / "height" beside it (None: native size).
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
    resolution = as_resolution(resolution if resolution is not None else ref.meta.get("resolution"))
    width, height = size_of(resolution) if resolution is not None else (None, None)
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
            "extractor": extractor.name, "resolution": resolution_record(resolution), "width": width,
            "height": height, "images": os.path.abspath(images_dir),
            "bad_images": source.counts["image"], "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
            "kid_seed": seed, "warnings": notes, "reference": {"path": os.path.abspath(reference_path), **ref.meta}}

