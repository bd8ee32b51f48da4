"""A deterministic synthetic domain: coloured circles, squares and triangles with GenEval captions.

Every image is a plain light-grey background with one to four shapes drawn with hard edges in
exact palette colours (no anti-aliasing), so a detector can recover every object exactly from the
pixels: a pixel is either `BACKGROUND` or one of `COLORS`, and each shape is one connected region.
Shapes never overlap and keep a gap between them; each side is 22–34 % of the image side
(14–21 px at the default 64 px, so still 7–10 px after downsampling to 32).

Captions use GenEval's templates, tags and include/exclude clauses (docs/design/evaluation.md §1.1), with the
shape names standing in for COCO classes. `tag = TAGS[index % 6]`, so the six tags have equal
shares. The image holds exactly the objects the caption names, nothing else:

  single_object  "a photo of a circle"                          one shape, any colour
  two_object     "a photo of a circle and a square"             two classes, any colours
  counting       "a photo of three green triangles"             N in {2,3,4}, one class, one colour
  colors         "a photo of a red circle"                      one shape
  position       "a photo of a red square left of a blue circle" two classes, any colours
  color_attr     "a photo of a red circle and a blue square"    two classes, two colours

Two deliberate departures from GenEval's prompts, both because every shape here has a colour:
counting and position captions *name* the colour (GenEval's do not), and their include clauses
carry it, so the GenEval judge checks the colour the caption states. Exclude clauses stay
`{class, N+1}` as in GenEval. Articles follow GenEval ("an orange circle").

Ground truth (`meta`): boxes are tight pixel boxes `[x0, y0, x1, y1]` with exclusive ends (the
`[x_min, y_min, x_max+1, y_max+1]` of mmdet's mask boxes) at the rendered size. `objects` are in
caption order; for `position` the caption is "A rel B", `objects == [A, B]`, and the include
clauses are GenEval's `[B, A + position: [rel, 0]]`. Position pairs satisfy GenEval's
`relative_position` rule (threshold 0.1) with only the stated relation true and a clear margin.

Other aspect ratios (`make_sample_sized`, `t2i make-shards shapes --aspects`): the sample is rendered
exactly as above on a square of side min(width, height) and pasted centred on a width × height canvas
of `BACKGROUND`; boxes shift by the paste offset and `meta` width/height give the canvas. The padding
is background, so the caption, clauses and relations stay true (GenEval's offsets are translation
invariant); shape sides are then 22–34 % of the *short* side.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from PIL import Image

from t2i.geneval_spec import POSITION_THRESHOLD, RELATIONS, TAGS, relative_offset

SHAPES = ("circle", "square", "triangle")
COLORS = {  # GenEval colour names; saturated and far apart in RGB
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUND = (215, 215, 215)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

MIN_SIZE = 32
SIDE_FRACTION = (0.22, 0.34)  # shape side as a fraction of the image side
POSITION_MARGIN = 0.2  # the stated relation's normalised offset is >= 0.5 + this, the others <= 0.5 - this


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean s×s mask of a shape: a pixel belongs to it iff its centre is inside."""
    c = np.arange(s) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "circle":
        return (x - s / 2) ** 2 + (y - s / 2) ** 2 <= (s / 2) ** 2
    if shape == "triangle":  # apex up, base on the bottom edge
        return np.abs(x - s / 2) <= y / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _tight_box(mask: np.ndarray, x: int, y: int) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1]


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> tuple[float, float]:
    """GenEval's normalised offset (dx, dy) of A relative to B (t2i.geneval_spec.relative_offset), (0, 0)
    when the objects overlap too much for any relation."""
    return relative_offset(box_a, box_b, threshold) or (0.0, 0.0)


def _relation_is_clear(rel: str, box_a, box_b) -> bool:
    dx, dy = relative_position(box_a, box_b)
    main, cross = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    sign = -1 if rel in ("left of", "above") else 1
    return sign * main >= 0.5 + POSITION_MARGIN and abs(cross) <= 0.5 - POSITION_MARGIN


# ----------------------------------------------------------------------------------------------
# Layout: cells (x, y, side) inside the image, pairwise separated by `gap` pixels
# ----------------------------------------------------------------------------------------------


def _geometry(size: int) -> tuple[int, int, int, int]:
    lo, hi = math.ceil(SIDE_FRACTION[0] * size), math.floor(SIDE_FRACTION[1] * size)
    border, gap = max(1, size // 32), max(2, size // 16)
    return lo, hi, border, gap


def _separated(a, b, gap: int) -> bool:
    (xa, ya, sa), (xb, yb, sb) = a, b
    return xa + sa + gap <= xb or xb + sb + gap <= xa or ya + sa + gap <= yb or yb + sb + gap <= ya


def _scatter(rng, sides, size: int) -> list[tuple[int, int, int]]:
    """Random non-overlapping cells; falls back to a shuffled 2×2 grid (always fits) if unlucky."""
    _, _, border, gap = _geometry(size)
    for _ in range(100):
        cells = []
        for s in sides:
            for _ in range(50):
                cell = (int(rng.integers(border, size - border - s + 1)),
                        int(rng.integers(border, size - border - s + 1)), s)
                if all(_separated(cell, c, gap) for c in cells):
                    cells.append(cell)
                    break
            else:
                break
        if len(cells) == len(sides):
            return cells
    half = size // 2
    slots = rng.permutation(4)[: len(sides)]
    return [((k % 2) * half + (half - s) // 2, (k // 2) * half + (half - s) // 2, s) for k, s in zip(slots, sides)]


def _pair_layout(rng, rel: str, shapes, sides, size: int):
    """Cells for (A, B) with A `rel` B under GenEval's rule with a clear margin, or None."""
    _, _, border, gap = _geometry(size)
    first, second = (0, 1) if rel in ("left of", "above") else (1, 0)  # first = left/top shape
    sf, ss = sides[first], sides[second]
    main_room = size - 2 * border - sf - ss - gap
    if main_room < 0:
        return None
    m_first = border + int(rng.integers(0, main_room + 1))
    m_second = int(rng.integers(m_first + sf + gap, size - border - ss + 1))
    centre = rng.uniform(size * 0.2, size * 0.8)
    jitter = 0.08 * size
    crosses = []
    for s in (sf, ss):
        c = int(round(centre - s / 2 + rng.uniform(-jitter, jitter)))
        crosses.append(min(max(c, border), size - border - s))
    cells = [None, None]
    for idx, m, c, s in ((first, m_first, crosses[0], sf), (second, m_second, crosses[1], ss)):
        cells[idx] = (m, c, s) if rel in ("left of", "right of") else (c, m, s)
    boxes = [_tight_box(shape_mask(sh, s), x, y) for sh, (x, y, s) in zip(shapes, cells)]
    return cells if _relation_is_clear(rel, boxes[0], boxes[1]) else None


# ----------------------------------------------------------------------------------------------
# Captions and GenEval clauses
# ----------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _np(obj: dict, with_color: bool) -> str:
    return _a(f"{obj['color']} {obj['shape']}" if with_color else obj["shape"])


def caption_and_clauses(tag: str, objs: list[dict], rel: str | None = None):
    """The caption of `tag` for `objs` ({"shape", "color"} each, in caption order) and its GenEval include and
    exclude clauses."""
    if tag == "single_object":
        return f"a photo of {_np(objs[0], False)}", [{"class": objs[0]["shape"], "count": 1}], []
    if tag == "colors":
        o = objs[0]
        return f"a photo of {_np(o, True)}", [{"class": o["shape"], "count": 1, "color": o["color"]}], []
    if tag == "two_object":
        a, b = objs
        return (f"a photo of {_np(a, False)} and {_np(b, False)}",
                [{"class": a["shape"], "count": 1}, {"class": b["shape"], "count": 1}], [])
    if tag == "color_attr":
        a, b = objs
        return (f"a photo of {_np(a, True)} and {_np(b, True)}",
                [{"class": o["shape"], "count": 1, "color": o["color"]} for o in (a, b)], [])
    if tag == "counting":
        n, o = len(objs), objs[0]
        return (f"a photo of {COUNT_WORDS[n]} {o['color']} {o['shape']}s",
                [{"class": o["shape"], "count": n, "color": o["color"]}],
                [{"class": o["shape"], "count": n + 1}])
    if tag == "position":
        a, b = objs
        return (f"a photo of {_np(a, True)} {rel} {_np(b, True)}",
                [{"class": b["shape"], "count": 1, "color": b["color"]},
                 {"class": a["shape"], "count": 1, "color": a["color"], "position": [rel, 0]}], [])
    raise ValueError(f"unknown tag {tag!r}")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def make_sample(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, dict]:
    """Image, caption and exact ground truth of sample `index`; a pure function of (index, seed, size)."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} px so shapes stay recognisable, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    tag = TAGS[index % len(TAGS)]
    names = list(COLORS)
    lo, hi, _, _ = _geometry(size)

    def pick(seq, k=1, distinct=True):
        return [seq[i] for i in rng.choice(len(seq), size=k, replace=not distinct)]

    rel = None
    if tag in ("single_object", "colors"):
        shapes, colors = pick(SHAPES), pick(names)
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        shapes, colors = pick(SHAPES) * n, pick(names) * n
    else:  # two objects of different classes; color_attr also needs different colours
        shapes = pick(SHAPES, 2)
        colors = pick(names, 2, distinct=(tag == "color_attr"))
    sides = [int(s) for s in rng.integers(lo, hi + 1, size=len(shapes))]

    if tag == "position":
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        cells = None
        while cells is None:  # terminates: at the minimum sizes most layouts pass
            cells = _pair_layout(rng, rel, shapes, sides, size)
            sides = [int(s) for s in rng.integers(lo, hi + 1, size=2)] if cells is None else sides
    else:
        cells = _scatter(rng, sides, size)

    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    objects = []
    for shape, color, (x, y, s) in zip(shapes, colors, cells):
        mask = shape_mask(shape, s)
        pixels[y:y + s, x:x + s][mask] = COLORS[color]
        objects.append({"shape": shape, "color": color, "rgb": list(COLORS[color]), "box": _tight_box(mask, x, y)})

    caption, include, exclude = caption_and_clauses(tag, objects, rel)
    meta = {"caption": caption, "tag": tag, "width": size, "height": size, "background": list(BACKGROUND),
            "objects": objects, "include": include, "exclude": exclude}
    return Image.fromarray(pixels, "RGB"), caption, meta


def iter_samples(n: int, seed: int = 0, size: int = 64) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """(key, image, caption, meta) for indices 0..n-1; key = f"{index:08d}"."""
    for index in range(n):
        image, caption, meta = make_sample(index, seed, size)
        yield f"{index:08d}", image, caption, meta


def make_sample_sized(index: int, seed: int = 0, width: int = 64, height: int = 64) -> tuple[Image.Image, str, dict]:
    """Sample `index` on a width × height canvas: `make_sample(index, seed, size=min(width, height))`
    pasted centred on `BACKGROUND` (offset ((width − s) // 2, (height − s) // 2)), boxes shifted by
    the offset, meta width/height = (width, height). A square size returns `make_sample`'s sample
    unchanged. Both sides must be >= MIN_SIZE."""
    if width < MIN_SIZE or height < MIN_SIZE:
        raise ValueError(f"width and height must be >= {MIN_SIZE} px so shapes stay recognisable, "
                         f"got {width}x{height}")
    side = min(width, height)
    image, caption, meta = make_sample(index, seed, side)
    if width == height:
        return image, caption, meta
    dx, dy = (width - side) // 2, (height - side) // 2
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(image, (dx, dy))
    objects = [{**o, "box": [o["box"][0] + dx, o["box"][1] + dy, o["box"][2] + dx, o["box"][3] + dy]}
               for o in meta["objects"]]
    return canvas, caption, {**meta, "width": width, "height": height, "objects": objects}
