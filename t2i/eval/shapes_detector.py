"""Exact scoring of images in the synthetic shapes domain, from pixels (no weights needed).

`detect` finds palette-coloured connected regions and names their shape by how much of their box
they fill (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2); `judge` applies GenEval's include/exclude
rules (docs/design/evaluation.md §1.5: counts, colours, relative position) to those detections and a sample's
`include`/`exclude` clauses. This is what the MixFlow toy experiment uses as its quality metric.

`ShapesDetector` and `ShapesColorClassifier` are the same detector as GenEval backends
(t2i.eval.geneval.Detector / ColorClassifier), so `t2i geneval --detector shapes` scores a GenEval-layout
folder of shapes images with the official rules.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from t2i.eval import geneval
from t2i.data.shapes import BACKGROUND, COLORS, SHAPES
from t2i.eval.geneval import Detection

PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
NAMES = ["background", *COLORS]


def detect(image: np.ndarray, min_area_frac: float = 0.01, max_color_dist: float = 90.0,
           with_masks: bool = False) -> list[dict]:
    """Shapes in an RGB uint8 image [H, W, 3]: [{"shape", "color", "box": [x0, y0, x1, y1], "area"}]
    (+ "mask", a bool [H, W] array, with `with_masks`), largest first. Pixels farther than
    `max_color_dist` from every palette colour are ignored."""
    h, w, _ = image.shape
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - PALETTE[None, None], axis=-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > max_color_dist] = 0
    found = []
    for ci, color in enumerate(NAMES[1:], start=1):
        mask = ndimage.binary_opening(label == ci, structure=np.ones((2, 2)))  # drop isolated pixels
        regions, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k, sl in enumerate(ndimage.find_objects(regions), start=1):
            region = regions[sl] == k
            area = int(region.sum())
            if area < min_area_frac * h * w:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            found.append({"shape": classify(region), "color": color, "box": [x0, y0, x1, y1], "area": area})
            if with_masks:
                found[-1]["mask"] = regions == k
    return sorted(found, key=lambda d: -d["area"])


def off_palette_fraction(images: np.ndarray, max_color_dist: float = 48.0) -> np.ndarray:
    """Per image, the fraction of pixels farther than `max_color_dist` (RGB, 0–255) from every palette colour
    (background included): a continuous measure of leftover noise in the shapes domain. Real images are not
    at 0 (anti-aliased edges blend two colours), so compare models against held-out data, not against 0.

    `images`: uint8 [B, H, W, 3] (or one [H, W, 3] image, giving a 0-d array)."""
    x = np.asarray(images, dtype=np.float32)
    dist = np.sqrt(((x[..., None, :] - PALETTE) ** 2).sum(-1)).min(-1)
    return (dist > max_color_dist).mean(axis=(-2, -1))


def classify(region: np.ndarray) -> str:
    """Square: fills its box; triangle (apex up): most of its mass in the lower half; else circle."""
    h = region.shape[0]
    fill = region.mean()
    rows = region.sum(1).astype(float)
    top, bottom = rows[: h // 2].sum(), rows[h - h // 2:].sum()
    asymmetry = (bottom - top) / max(1.0, rows.sum())
    if fill >= 0.95:
        return "square"
    return "triangle" if asymmetry > 0.2 else "circle"


def judge(detections: list[dict], include: list[dict], exclude: list[dict] = ()) -> bool:
    """GenEval's per-image rule (t2i.eval.geneval.judge) over `detect`'s output ("class" is the shape name)."""
    kept: dict[str, list[Detection]] = {}
    colour: dict[int, str] = {}
    for d in detections:
        obj = Detection(SHAPES.index(d["shape"]), 1.0, tuple(d["box"]))
        kept.setdefault(d["shape"], []).append(obj)
        colour[id(obj)] = d["color"]
    correct, _ = geneval.judge(kept, {"include": include, "exclude": list(exclude)},
                               lambda objs, _name: [colour[id(o)] for o in objs])
    return correct


class ShapesDetector:
    """The exact shapes detector as a GenEval `Detector`: every region found by `detect` becomes a
    detection of its shape class with score 1.0, its tight box and its pixel mask."""
    name = "shapes-exact"
    class_names = list(SHAPES)

    def __call__(self, images: list[Image.Image]) -> list[list[Detection]]:
        out = []
        for image in images:
            arr = np.asarray(image.convert("RGB"))
            out.append([Detection(SHAPES.index(d["shape"]), 1.0, tuple(d["box"]), d["mask"])
                        for d in detect(arr, with_masks=True)])
        return out


class ShapesColorClassifier:
    """A GenEval `ColorClassifier` for the shapes domain: the palette colour nearest to the median
    RGB of the object's pixels (its mask, else its box)."""
    name = "shapes-palette"
    colors = list(COLORS)

    def __call__(self, image: Image.Image, objects: list[Detection], class_name: str) -> list[str]:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        names, rgb = list(COLORS), np.array(list(COLORS.values()), dtype=np.float32)
        out = []
        for obj in objects:
            x0, y0, x1, y1 = (int(round(v)) for v in obj.box[:4])
            pixels = arr[obj.mask] if obj.mask is not None else arr[y0:y1, x0:x1].reshape(-1, 3)
            median = np.median(pixels, axis=0)
            out.append(names[int(np.linalg.norm(rgb - median, axis=1).argmin())])
        return out
