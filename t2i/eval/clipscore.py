"""CLIPScore from a local open_clip checkpoint (docs/design/evaluation.md §6), and the shared open_clip loader.

    score(image, prompt) = max(w · cos(E_img(image), E_txt(prompt)), 0)

with w = 100 by default (torchmetrics' `CLIPScore` convention: max(100·cos, 0), default model OpenAI
CLIP ViT-L/14). The original CLIP-S of Hessel et al. (arXiv 2104.08718) is w = 2.5 with ViT-B/32:
pass `w=2.5` (and that model) for it. Prompts longer than the context (77 tokens) are truncated by
the tokenizer.

Weights are never downloaded: `pretrained` must be a local file. For OpenAI CLIP ViT-L/14 (the
GenEval colour classifier and torchmetrics' default) use model name "ViT-L-14-quickgelu" (OpenAI
trained with QuickGELU; open_clip's plain "ViT-L-14" uses GELU and only switches for the "openai"
tag) and the file open_clip itself fetches for `pretrained="openai"`: `open_clip_pytorch_model.bin`
(or `open_clip_model.safetensors`) from huggingface.co/timm/vit_large_patch14_clip_224.openai.
OpenAI's original TorchScript `ViT-L-14.pt` is also accepted (read with torch.jit.load, which rebuilds
TorchScript and tensors only; not tested here against the real file). No file is ever unpickled with
Python objects (t2i.trust).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from t2i.errors import EvalError
from t2i.eval.geneval import BadImage, bad_images, list_images, load_image


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with `<root>/constants.pkl` and `<root>/code/` (OpenAI's CLIP .pt)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _state_dict(path: Path) -> dict:
    """The weights of a local CLIP file without running any code from it: safetensors; a state dict
    pickle scanned and loaded weights-only (t2i.trust); or a TorchScript archive through
    torch.jit.load, whose unpickler rebuilds only TorchScript and tensor types, never Python objects."""
    from t2i import trust

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 -- a zip that only looks like TorchScript
            raise EvalError(f"{path}: not a loadable TorchScript archive ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        state = scripted.state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        return state
    state = trust.load(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise EvalError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_clip(model_name: str, pretrained: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model in eval mode, eval image transform, tokenizer) for an open_clip model name (built-in or
    registered with `open_clip.add_model_config`) and a LOCAL checkpoint file, loaded strictly. The
    tokenizer is `open_clip.get_tokenizer(model_name)`: the bundled BPE SimpleTokenizer for OpenAI-style
    models (offline); a model config naming an HF tokenizer would need it in the local HF cache."""
    import open_clip

    path = Path(pretrained) if pretrained is not None else None
    if path is None or not path.is_file():
        raise EvalError(
            f"open_clip checkpoint {pretrained!r} is not a local file; weights are never downloaded here. "
            "For OpenAI ViT-L/14 use model 'ViT-L-14-quickgelu' with open_clip_pytorch_model.bin from "
            "huggingface.co/timm/vit_large_patch14_clip_224.openai")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    try:
        model.load_state_dict(_state_dict(path), strict=True)
    except RuntimeError as e:  # keys or shapes of another model
        raise EvalError(f"{path} does not fit open_clip model {model_name!r}: {str(e).splitlines()[0][:300]}") from None
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(model_name)


class ClipScorer:
    """Per-image CLIPScore: max(w · cos(image, prompt), 0); see the module docstring."""

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, w: float = 100.0):
        self.model_name, self.device, self.batch_size, self.w = model_name, torch.device(device), batch_size, w
        self.model, self.preprocess, self.tokenizer = load_open_clip(model_name, pretrained, self.device)

    @property
    def name(self) -> str:
        return f"clipscore({self.model_name})"

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, on the CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, on the CPU)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """max(w · cos(image_i, prompt_i), 0) for each pair, as float64 [N]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return np.zeros(0)
        row = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # embed each distinct prompt once
        text = self.embed_texts(list(row))[[row[p] for p in prompts]]
        cos = (self.embed_images(images) * text).sum(-1)
        return (self.w * cos).clamp(min=0).double().numpy()


# ----------------------------------------------------------------------------------------------
# A GenEval-layout folder
# ----------------------------------------------------------------------------------------------


def geneval_samples(root: str | Path) -> list[tuple[str, str, Path]]:
    """(folder name, prompt, image path) for every sample GenEval's evaluator would read, sorted."""
    return [(path.parent.parent.name, meta["prompt"], path)
            for _, (meta, paths) in sorted(list_images(root).items()) for path in paths]


def score_folder(images: str | Path, model: str, pretrained: str | Path, device: str = "cpu",
                 batch_size: int = 32, progress: bool = True) -> dict:
    """{"mean", "std", "n", "model", "pretrained", "per_prompt"} for a GenEval-layout folder."""
    items = geneval_samples(images)
    if not items:
        raise EvalError(f"no <digits>/samples/<digits>.png images under {images}")
    bad = bad_images([path for _, _, path in items])  # before the model is loaded
    if bad:
        raise EvalError(f"{len(bad)} of {len(items)} images in {images} cannot be scored:\n  "
                        + "\n  ".join(f"{b['file']}: {b['reason']}" for b in bad) + "\n(re-sample them)")
    scorer = ClipScorer(model, pretrained, device, batch_size)
    scores = []
    with tqdm(total=len(items), desc=scorer.name, unit="img", disable=not progress) as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            try:
                pics = [load_image(path) for _, _, path in chunk]  # EXIF-transposed RGB, pixel cap
            except BadImage as e:
                raise EvalError(f"cannot score an image of {images}: {e} (re-sample it)") from None
            scores.extend(scorer.score(pics, [prompt for _, prompt, _ in chunk]).tolist())
            bar.update(len(chunk))

    per_prompt: dict[str, dict] = {}
    for (folder, prompt, path), score in zip(items, scores, strict=True):
        per_prompt.setdefault(folder, {"prompt": prompt, "scores": {}})["scores"][path.name] = score
    for entry in per_prompt.values():
        entry["mean"] = float(np.mean(list(entry["scores"].values())))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "n": len(scores),
            "model": scorer.name, "pretrained": str(pretrained), "per_prompt": per_prompt}
