"""GenEval backends by name: the detector and the colour classifier a `--detector` / `--color` spec names.

    shapes                         exact detector / palette colours of the synthetic shapes domain
    mask2former:<local folder>     transformers Mask2Former (GenEval-compatible, t2i.eval.detectors)
    clip:<local open_clip file>    zero-shot CLIP colour classifier (optionally clip:<model name>:<file>)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from t2i.errors import EvalError
from t2i.eval.geneval import ColorClassifier, Detector




def build_detector(spec: str, device="cpu", class_names: Optional[list[str]] = None) -> Detector:
    """"shapes" (exact, synthetic shapes domain) or "mask2former:<local folder>"."""
    if spec == "shapes":
        from t2i.eval.shapes_detector import ShapesDetector
        return ShapesDetector()
    kind, _, path = spec.partition(":")
    if kind == "mask2former" and path:
        from t2i.eval.detectors import Mask2FormerDetector
        return Mask2FormerDetector(path, device=device, class_names=class_names)
    raise EvalError(f"unknown detector {spec!r}; use 'shapes' or 'mask2former:<local folder>'")


def build_color_classifier(spec: Optional[str], device="cpu") -> Optional[ColorClassifier]:
    """None, "shapes" (palette colour of the object's pixels) or "clip:<local open_clip ViT-L-14 file>"
    (optionally "clip:<model name>:<file>")."""
    if spec in (None, "", "none"):
        return None
    if spec == "shapes":
        from t2i.eval.shapes_detector import ShapesColorClassifier
        return ShapesColorClassifier()
    kind, _, rest = spec.partition(":")
    if kind == "clip" and rest:
        from t2i.eval.detectors import ClipColorClassifier
        name, _, path = rest.partition(":") if ":" in rest and not Path(rest).exists() else ("", "", rest)
        return ClipColorClassifier(model_name=name or "ViT-L-14-quickgelu", pretrained=path, device=device)
    raise EvalError(f"unknown colour classifier {spec!r}; use 'shapes' or 'clip:<local file>'")
