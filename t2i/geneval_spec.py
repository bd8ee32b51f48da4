"""GenEval's vocabulary and position geometry, defined once: the six tags (in the official file's
order), its ten colour names, and the relative-position rule (docs/design/evaluation.md §1.5 step D).

Shared by the scorer (t2i.eval.geneval) and by the synthetic shapes data (t2i.data.shapes), whose
captions must satisfy the same rule the scorer applies. Pure Python + NumPy, imports nothing of t2i.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # file order
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # evaluate_images.py's position_threshold




def relative_offset(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> Optional[tuple[float, float]]:
    """Normalised offset (dx, dy) of A relative to B, or None when the revised offset vanishes.

    o = centre(A) − centre(B); revised = sign(o)·max(|o| − threshold·(dA + dB), 0) per axis with dA, dB
    the box sizes; None if both |revised| < 1e-3, else revised / ‖o‖ (the *original* offset's norm)."""
    a, b = np.asarray(box_a, float)[:4], np.asarray(box_b, float)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.sign(offset) * np.maximum(np.abs(offset) - threshold * dims, 0)
    if np.all(np.abs(revised) < 1e-3):
        return None
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of A to B: "left of" dx < −0.5, "right of" dx > 0.5, "above" dy < −0.5, "below"
    dy > 0.5 (image y grows downward); several can hold, none when the objects sit on each other."""
    d = relative_offset(box_a, box_b, threshold)
    if d is None:
        return set()
    dx, dy = d
    return {rel for rel, ok in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                ("above", dy < -0.5), ("below", dy > 0.5)) if ok}
