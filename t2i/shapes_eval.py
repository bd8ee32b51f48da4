"""Exact scoring of images in the synthetic shapes domain, from pixels (no weights needed).

`detect` finds palette-coloured connected regions and names their shape by how much of their box
they fill (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2); `judge` applies GenEval's include/exclude
rules (EVALUATORS.md §1.5: counts, colours, relative position) to those detections and a sample's
`include`/`exclude` clauses. This is what the MixFlow toy experiment uses as its quality metric.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from t2i.data.shapes import BACKGROUND, COLORS, relative_position

PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
NAMES = ["background", *COLORS]


def detect(image: np.ndarray, min_area_frac: float = 0.01, max_color_dist: float = 90.0) -> list[dict]:
    """Shapes in an RGB uint8 image [H, W, 3]: [{"shape", "color", "box": [x0, y0, x1, y1], "area"}],
    largest first. Pixels farther than `max_color_dist` from every palette colour are ignored."""
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
    return sorted(found, key=lambda d: -d["area"])


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
    """GenEval's per-image rule over exact detections ("class" is the shape name)."""
    matched: list = []
    for clause in include:
        found = [d for d in detections if d["shape"] == clause["class"]][: clause["count"]]
        ok = len(found) >= clause["count"]
        if ok and "color" in clause:
            ok = sum(d["color"] == clause["color"] for d in found) >= clause["count"]
        if ok and "position" in clause:
            rel, j = clause["position"]
            target = matched[j]
            ok = target is not None and all(rel in relations(a["box"], b["box"]) for a in found for b in target)
        if not ok:
            return False
        matched.append(found)
    return all(sum(d["shape"] == c["class"] for d in detections) < c["count"] for c in exclude)


def relations(box_a, box_b) -> set[str]:
    dx, dy = relative_position(box_a, box_b)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out
