"""GenEval's detector and colour classifier run from LOCAL weights (docs/design/evaluation.md §1.4, §1.5 Step C, §4.2).

`Mask2FormerDetector` runs transformers' Mask2Former with mmdet 2.x's test pipeline and its
`MaskFormerFusionHead.instance_postprocess` re-implemented, so scores mean what GenEval's 0.3 / 0.9
thresholds expect. With Facebook's HF weights (e.g. facebook/mask2former-swin-small-coco-instance)
numbers are "GenEval-compatible", not official: GenEval's checkpoint is mmdet's own Swin-S training.

`ClipColorClassifier` is GenEval's zero-shot colour classifier (open_clip ViT-L/14, OpenAI weights).

Nothing here downloads: both take local paths and fail with a clear message otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.eval.clipscore import load_open_clip
from t2i.eval.geneval import Detection
from t2i.geneval_spec import GENEVAL_COLORS

MMDET_MEAN = (123.675, 116.28, 103.53)      # ImageNet mean / std on 0-255 RGB (mmdet img_norm_cfg)
MMDET_STD = (58.395, 57.12, 57.375)
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


# ----------------------------------------------------------------------------- mmdet helpers

def rescale_size(width: int, height: int, scale: tuple[int, int] = (1333, 800)) -> tuple[int, int]:
    """mmcv.rescale_size (keep_ratio): f = min(max(scale)/max(h, w), min(scale)/min(h, w));
    new (w, h) = (int(w·f + 0.5), int(h·f + 0.5)). (1333, 800): short side 800, long side <= 1333."""
    f = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * f + 0.5), int(height * f + 0.5)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet mask2bbox: bool [N, H, W] -> float [N, 4] = [x_min, y_min, x_max + 1, y_max + 1]; zeros if empty."""
    _, h, w = masks.shape
    xs, ys = masks.any(1), masks.any(2)                         # [N, W], [N, H]
    x0, y0 = xs.int().argmax(1), ys.int().argmax(1)
    x1, y1 = w - xs.flip(1).int().argmax(1), h - ys.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return boxes * masks.flatten(1).any(1, keepdim=True)


# ----------------------------------------------------------------------------- detector

class Mask2FormerDetector:
    """GenEval's detector: Mask2Former instance segmentation (COCO), mmdet 2.x test-time behaviour.

    Preprocess (mmdet test pipeline): keep-ratio resize to `scale` (short side 800, long side <= 1333;
    bilinear via torch on the 0-255 image, rounded to integers as cv2 does on uint8 — cv2's fixed-point
    weights can differ by one grey level), normalise (x - MMDET_MEAN) / MMDET_STD, pad bottom/right with
    zeros to a multiple of 32 (`pixel_mask` marks the valid area). Only images of equal resized size
    share a batch, so every image is padded exactly as mmdet pads it alone.

    Postprocess (MaskFormerFusionHead.instance_postprocess), per image:
      p = softmax(class_logits)[:, :-1]                  # [Q, C], "no object" dropped
      top k = min(max_per_image, Q·C) (query, class) pairs of p over the flattened matrix
      m = mask logits of the query, upsampled (bilinear) to the padded input, cropped to the valid area,
          resized (bilinear) to the original image size;  binary = m > 0
      mask_score = Σ sigmoid(m)·binary / (Σ binary + 1e-6);  score = p · mask_score
      box = [x_min, y_min, x_max + 1, y_max + 1] of binary (zeros when empty); no NMS.
    Detections come sorted by score, descending.

    `class_names` default to the checkpoint's id2label in index order. GenEval's object_names.txt is the
    80 COCO thing classes in COCO order (8 renamed for prompts, e.g. "computer mouse"), which is the
    index order of HF's COCO-instance Mask2Former id2label; pass that list to match prompt spellings.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", class_names: Sequence[str] | None = None,
                 batch_size: int = 4, scale: tuple[int, int] = (1333, 800), max_per_image: int = 100):
        from transformers import Mask2FormerForUniversalSegmentation

        path = Path(path)
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path} is not a local Mask2Former folder (no config.json); expected e.g. a "
                                    "local copy of facebook/mask2former-swin-small-coco-instance")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "mask2former":
            raise ValueError(f"{config} has model_type={model_type!r}, expected 'mask2former'")
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=True)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        n = self.model.config.num_labels
        self.class_names = list(class_names) if class_names is not None else \
            [self.model.config.id2label[i] for i in range(n)]
        if len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class names for a model with {n} classes")
        self.name = f"mask2former({path.resolve().name})"
        self.batch_size, self.scale, self.max_per_image = batch_size, tuple(scale), max_per_image

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """(pixel_values [B, 3, Hp, Wp] float, pixel_mask [B, Hp, Wp] long, valid (h, w) per image)."""
        mean, std = torch.tensor(MMDET_MEAN)[:, None, None], torch.tensor(MMDET_STD)[:, None, None]
        xs = []
        for image in images:
            w, h = rescale_size(*image.size, self.scale)
            x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)[0]
            xs.append((x - mean) / std)
        hp = -(-max(x.shape[1] for x in xs) // 32) * 32
        wp = -(-max(x.shape[2] for x in xs) // 32) * 32
        pixel_values = torch.zeros(len(xs), 3, hp, wp)
        pixel_mask = torch.zeros(len(xs), hp, wp, dtype=torch.long)
        for i, x in enumerate(xs):
            pixel_values[i, :, : x.shape[1], : x.shape[2]] = x
            pixel_mask[i, : x.shape[1], : x.shape[2]] = 1
        return pixel_values, pixel_mask, [tuple(x.shape[1:]) for x in xs]

    def postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw: tuple[int, int],
                    valid_hw: tuple[int, int], original_hw: tuple[int, int]) -> list[Detection]:
        """One image: class_logits [Q, C+1], mask_logits [Q, h, w] -> detections (see the class docstring)."""
        probs = class_logits.float().softmax(-1)[:, :-1]
        q, c = probs.shape
        class_scores, flat = probs.flatten().topk(min(self.max_per_image, q * c))
        queries, labels = flat // c, flat % c
        unique, inverse = queries.unique(return_inverse=True)
        binaries, mask_scores = [], []
        for chunk in unique.split(10):                          # bounds memory at 1333x800 on big images
            m = F.interpolate(mask_logits[chunk][None].float(), size=tuple(padded_hw), mode="bilinear",
                              align_corners=False)[0, :, : valid_hw[0], : valid_hw[1]]
            m = F.interpolate(m[None], size=tuple(original_hw), mode="bilinear", align_corners=False)[0]
            binary = m > 0
            mask_scores.append((m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6))
            binaries.append(binary)
        binary = torch.cat(binaries)
        boxes, masks = mask_boxes(binary).tolist(), list(binary.cpu().numpy())
        scores = (class_scores * torch.cat(mask_scores)[inverse]).tolist()
        dets = [Detection(label, score, tuple(boxes[u]), masks[u])
                for label, score, u in zip(labels.tolist(), scores, inverse.tolist())]
        return sorted(dets, key=lambda d: -d.score)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[list[Detection]]:
        sizes = [rescale_size(*im.size, self.scale) for im in images]
        batches: list[list[int]] = []
        for i, size in enumerate(sizes):                        # consecutive images of one resized size
            if batches and sizes[batches[-1][0]] == size and len(batches[-1]) < self.batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
        results: list[list[Detection]] = [[] for _ in images]
        for batch in batches:
            pixel_values, pixel_mask, valid = self.preprocess([images[i] for i in batch])
            out = self.model(pixel_values=pixel_values.to(self.device), pixel_mask=pixel_mask.to(self.device))
            for j, i in enumerate(batch):
                results[i] = self.postprocess(out.class_queries_logits[j], out.masks_queries_logits[j],
                                              pixel_values.shape[-2:], valid[j], (images[i].height, images[i].width))
        return results


# ----------------------------------------------------------------------------- colour classifier

def geneval_crop(image: Image.Image, det: Detection, bgcolor: str = "#999") -> Image.Image:
    """GenEval Step C: paste the object on a uniform `bgcolor` image through its mask (when it has one),
    then crop to its box (PIL rounds float box coordinates)."""
    image = image.convert("RGB")
    if det.mask is not None:
        if det.mask.shape != (image.height, image.width):
            raise ValueError(f"mask {det.mask.shape} does not match the image {(image.height, image.width)}")
        image = Image.composite(image, Image.new("RGB", image.size, bgcolor), Image.fromarray(det.mask.astype(bool)))
    return image.crop(tuple(float(v) for v in det.box[:4]))


class ClipColorClassifier:
    """GenEval's colour classifier (docs/design/evaluation.md §1.5 Step C), zero-shot with open_clip.

    Per class name, a classifier W [D, n_colors] built as CLIP_benchmark's `zero_shot_classifier`:
      W[:, k] = normalize(mean_t normalize(E_txt(template_t(color_k, class))))   over COLOR_TEMPLATES
    (cached). Per object: logits = 100 · normalize(E_img(preprocess(geneval_crop(image, obj)))) @ W,
    predicted colour = argmax. GenEval ran this under CUDA autocast (fp16); here it runs in the
    model's dtype (fp32 by default).

    Default: OpenAI CLIP ViT-L/14 as open_clip "ViT-L-14-quickgelu" from a local checkpoint file
    (see t2i.eval.clipscore for which file).
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | Path | None = None,
                 device: str | torch.device = "cpu", colors: Sequence[str] = GENEVAL_COLORS, batch_size: int = 16,
                 bgcolor: str = "#999"):
        self.device = torch.device(device)
        self.model, self.preprocess, self.tokenizer = load_open_clip(model_name, pretrained, self.device)
        self.name = f"clip-color({model_name})"
        self.colors, self.batch_size, self.bgcolor = list(colors), batch_size, bgcolor
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, class_name: str) -> torch.Tensor:
        """W [D, n_colors], unit-norm columns, for this class name (cached)."""
        if class_name not in self._classifiers:
            columns = []
            for color in self.colors:
                texts = [t.format(color=color, cls=class_name) for t in COLOR_TEMPLATES]
                emb = F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
                columns.append(F.normalize(emb.mean(0), dim=0))
            self._classifiers[class_name] = torch.stack(columns, 1)
        return self._classifiers[class_name]

    @torch.no_grad()
    def logits(self, image: Image.Image, objects: list[Detection], class_name: str) -> torch.Tensor:
        """100 · normalize(image embedding of each object's crop) @ W  -> [len(objects), n_colors]."""
        crops = [self.preprocess(geneval_crop(image, det, self.bgcolor)) for det in objects]
        out = [torch.zeros(0, len(self.colors), device=self.device)]
        for i in range(0, len(crops), self.batch_size):
            x = torch.stack(crops[i:i + self.batch_size]).to(self.device)
            out.append(100.0 * F.normalize(self.model.encode_image(x).float(), dim=-1) @ self.classifier(class_name))
        return torch.cat(out)

    def __call__(self, image: Image.Image, objects: list[Detection], class_name: str) -> list[str]:
        return [self.colors[k] for k in self.logits(image, objects, class_name).argmax(1).tolist()]
