"""Aspect-ratio buckets: which sizes a run trains at, and which one an image goes to.

`data.buckets` takes three forms (docs/design/buckets.md has the whole design):

* absent / null: no buckets; every image is short-side resized and centre-cropped to the square
  `data.resolution` (t2i.data.decode.resize_center_crop), as before buckets existed;
* a rule, `{area: PIXELS, step: 64, min_aspect: 0.5, max_aspect: 2.0}` (`area` defaults to
  data.resolution²): for every height h = step, 2·step, ... up to √area the widest width w (a
  multiple of `step`) with w·h ≤ area, kept when min_aspect ≤ w/h ≤ max_aspect, and its transpose.
  At area 1024², step 64, [0.5, 2] that is 1024², 1088×960, 1152×896, 1216×832, 1344×768 and the
  transposes of the last four (SDXL's set without its 2.4:1 extreme, and kohya's rule);
* an explicit list of sizes, `["1024x1024", "1216x832", "832x1216"]`, written width × height.
  Images more extreme than the list's widest (tallest) bucket by more than LIST_MARGIN are dropped.

Assignment: an image of aspect a = w/h goes to the bucket whose aspect is nearest in log space
(|log a − log a_b|; ties to the first in the sorted order), is scaled to cover the bucket and
centre-cropped (t2i.data.decode.resize_cover_crop). An image outside [min_aspect, max_aspect] is a bad sample for
the reason "aspect" (t2i.data.loader), chosen from its size alone (the sample's json `width` /
`height`, or the image header: never a pixel decode; t2i.data.decode).

Everything here is plain Python over (width, height) tuples in pixels (no torch, no PIL), so the config
and the model's geometry check use it before anything heavy is imported; reading an image's size and the
cover crop are in t2i.data.decode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

from t2i.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels
RULE_KEYS = ("area", "step", "min_aspect", "max_aspect")
RULE_DEFAULTS = {"step": 64, "min_aspect": 0.5, "max_aspect": 2.0}
LIST_MARGIN = 1.1  # an explicit list accepts aspects up to 10 % beyond its extreme buckets
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


# ----------------------------------------------------------------------------------------------
# Sizes as text
# ----------------------------------------------------------------------------------------------


def parse_size(text: Union[str, int], key: str = "--resolution") -> Size:
    """"1216x832" -> (1216, 832) (width x height); a bare "512" or 512 -> (512, 512). ConfigError names `key`."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ConfigError(f"{key}: a size must be positive, got {text}")
        return text, text
    s = str(text).strip()
    if s.isdigit() and int(s) > 0:
        return int(s), int(s)
    m = _SIZE.match(s)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"{key}: {text!r} is not a size; write WIDTHxHEIGHT (e.g. 1216x832) or one number "
                          f"for a square")
    return int(m.group(1)), int(m.group(2))


def size_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


# ----------------------------------------------------------------------------------------------
# Bucket sets
# ----------------------------------------------------------------------------------------------


def rule_sizes(area: int, step: int, min_aspect: float, max_aspect: float) -> list[Size]:
    """The rule's buckets: per height h (multiple of step, h ≤ √area) the widest w (multiple of step)
    with w·h ≤ area, kept within [min_aspect, max_aspect], and the transposes; sorted by aspect."""
    out = set()
    h = step
    while h * h <= area:
        w = (area // h) // step * step
        for size in ((w, h), (h, w)):
            if w >= step and min_aspect <= size[0] / size[1] <= max_aspect:
                out.add(size)
        h += step
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


@dataclass(frozen=True)
class BucketSet:
    """The sizes (sorted by aspect, then width) and the range of image aspects they take."""
    sizes: tuple[Size, ...]
    min_aspect: float
    max_aspect: float

    @property
    def names(self) -> list[str]:
        return [size_name(s) for s in self.sizes]

    def assign(self, width: int, height: int) -> Optional[int]:
        """Index of the bucket for an image of this size, or None when its aspect is out of range."""
        if width < 1 or height < 1:
            return None
        a = width / height
        if not self.min_aspect <= a <= self.max_aspect:
            return None
        la = math.log(a)
        return min(range(len(self.sizes)), key=lambda i: abs(math.log(self.sizes[i][0] / self.sizes[i][1]) - la))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def most_square(self) -> Size:
        return min(self.sizes, key=lambda s: (abs(math.log(s[0] / s[1])), -s[0] * s[1]))

    def sample_sizes(self) -> list[Size]:
        """The sizes training sample grids draw: the most square bucket and the most extreme one (two
        buckets whenever the set has two)."""
        first = self.most_square()
        rest = [s for s in self.sizes if s != first]
        return [first] + ([max(rest, key=lambda s: (abs(math.log(s[0] / s[1])), s[0]))] if rest else [])

    def identity(self) -> dict:
        """What a cache or checkpoint records of the set (names and aspect range)."""
        return {"sizes": self.names, "min_aspect": self.min_aspect, "max_aspect": self.max_aspect}


def check_form(value, key: str = "data.buckets") -> None:
    """The value's form (null, a rule mapping, a list of "WxH"), without model knowledge; ConfigError."""
    if value is None:
        return
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(RULE_KEYS))
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], RULE_KEYS, n=1)
            hint = f"; did you mean '{key}.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}.{unknown[0]}'{hint} (a bucket rule has {', '.join(RULE_KEYS)})")
        for k in RULE_KEYS:
            v = value.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{key}.{k} must be a positive number, got {v!r}")
            if k in ("area", "step") and (not isinstance(v, int) and not float(v).is_integer()):
                raise ConfigError(f"{key}.{k} must be a whole number of pixels, got {v!r}")
        lo, hi = value.get("min_aspect", RULE_DEFAULTS["min_aspect"]), value.get("max_aspect", RULE_DEFAULTS["max_aspect"])
        if lo > 1 or hi < 1:
            raise ConfigError(f"{key}: min_aspect={lo} and max_aspect={hi} must bracket 1 (min_aspect <= 1 <= "
                              f"max_aspect; aspect = width / height)")
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{key} is an empty list; give at least one size such as \"1024x1024\", or null for "
                              f"the square data.resolution")
        seen = set()
        for item in value:
            size = parse_size(item, key=f"{key} entry {item!r}")
            if size in seen:
                raise ConfigError(f"{key} lists {size_name(size)} twice")
            seen.add(size)
        return
    raise ConfigError(f"{key} must be null, a rule {{area, step, min_aspect, max_aspect}} or a list of sizes "
                      f"such as [\"1024x1024\", \"1216x832\"], got {value!r}")


def bucket_set(value, resolution: int, key: str = "data.buckets") -> Optional[BucketSet]:
    """The BucketSet of a `data.buckets` value (None: no buckets); ConfigError naming `key`."""
    check_form(value, key)
    if value is None:
        return None
    if isinstance(value, dict):
        rule = {**RULE_DEFAULTS, "area": resolution * resolution, **{k: v for k, v in value.items() if v is not None}}
        area, step = int(rule["area"]), int(rule["step"])
        sizes = rule_sizes(area, step, float(rule["min_aspect"]), float(rule["max_aspect"]))
        if not sizes:
            raise ConfigError(f"{key}: the rule {rule} gives no bucket (area {area} is below step² = {step * step}?)")
        return BucketSet(tuple(sizes), float(rule["min_aspect"]), float(rule["max_aspect"]))
    sizes = sorted((parse_size(v, key=f"{key} entry {v!r}") for v in value), key=lambda s: (s[0] / s[1], s[0]))
    lo, hi = sizes[0][0] / sizes[0][1], sizes[-1][0] / sizes[-1][1]
    return BucketSet(tuple(sizes), min(lo, 1.0) / LIST_MARGIN, max(hi, 1.0) * LIST_MARGIN)


def check_sizes(buckets: BucketSet, multiple: int, max_side: Optional[int], what: str, key: str = "data.buckets") -> None:
    """Every bucket side divisible by `multiple` (VAE factor x patch) and at most `max_side` (the
    positional grid in pixels; None: no limit). `what` explains the numbers in the error."""
    for w, h in buckets.sizes:
        if w % multiple or h % multiple:
            raise ConfigError(f"{key}: bucket {w}x{h} has a side that is not a multiple of {multiple} ({what}); "
                              f"use sides in steps of {multiple}")
        if max_side is not None and max(w, h) > max_side:
            raise ConfigError(f"{key}: bucket {w}x{h} has a side of {max(w, h)} px, past the model's positional grid "
                              f"of {max_side} px ({what}); diffusers' PatchEmbed would fail at the first such batch")
