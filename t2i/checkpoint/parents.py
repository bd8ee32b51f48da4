"""The weights a run starts from and a LoRA run's model: train.init_from's parent, a LoRA run's frozen base
(recorded by content hash, rebuilt and checked), its adapters applied, and a diffusers-format adapter file
applied to any model.

    init_from_parent(model, cfg)         train.init_from's weights into `model`: a diffusers folder, a t2i run's
                                         EMA or raw weights, or a LoRA run's base with its adapters merged
    lora_base(model, cfg)                what a LoRA run's tags record of its base: where from, sha256
    weights_sha256(model)                the content hash of a model's parameters (tensors_sha256)
    base_model(cfg, meta, text, vae)     the run's base as training built it (train.init_from, else
                                         model.pretrained, else model.preset's random init from run.seed),
                                         refused unless its sha256 is the one meta.json "lora" records
    adapter_weights(root, tag, ema)      the tag's adapter tensors, keyed as peft's state dict
                                         (transformer_blocks.0.attn.to_q.lora_A.weight)
    adapted(root, tag, ema, text, vae)   base + adapters (peft layers, not merged) and what a manifest records
    apply_file(model, path)              a diffusers LoRA file (t2i's export or the community's) on a model
    run_lora_config(cfg, meta)           the LoraConfig of a run's adapters (no weights read: the export)
    merged_weights(root, tag, ema)       base + adapters folded in, a plain state dict (train.init_from)

A tag of a LoRA run holds the adapters only (docs/design/lora.md); the base is read again from the folder or
run the config names, so that folder must still be there. The content hash (`weights_sha256`;
rank 0 of training took it before the adapters were applied) makes sure it is the same base:
a folder replaced by another release, or a t2i parent trained further, is refused naming both hashes.
The adapters stay peft layers (W x + (alpha / r) B A x, as diffusers' load_lora_weights computes them), so a
sample equals diffusers' pipeline with the exported file; `t2i.models.lora.merge` folds them in where a plain
SD3Transformer2DModel is wanted (`t2i ckpt export --merge`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from t2i.checkpoint import store
from t2i.config import Config, from_dict
from t2i.errors import CheckpointError
from t2i.io import file_sha256
from t2i.models.mmdit import is_diffusers_folder, load_pretrained, load_weights


@dataclass
class AdapterInfo:
    """What a manifest records of an adapted model: the base and the adapter, each with its sha256."""
    base: str
    base_sha256: str       # weights_sha256 of the base, before the adapter
    adapter: str           # "<tag folder> (ema|raw)" or the adapter file
    adapter_sha256: str    # tensors_sha256 of the adapter: the same for a run's tag and for its export
    rank: int
    alpha: float
    modules: int
    adapter_file_sha256: str | None = None  # the file's bytes (--lora FILE)

    def record(self) -> dict:
        return dict(self.__dict__)


def source_of(cfg: Config) -> str | None:
    """The folder or run the base weights come from (None: model.preset's random init)."""
    return cfg.train.init_from or cfg.model.pretrained


def init_from_parent(model, cfg: Config) -> dict:
    """Load the parent's weights (train.init_from) into `model`; returns what <run>/parent.json records."""
    path = cfg.train.init_from
    if is_diffusers_folder(path):
        same = cfg.model.pretrained and Path(cfg.model.pretrained).resolve() == Path(path).resolve()
        if not same:  # model.pretrained already built the model from this folder: no second load
            load_weights(model, load_pretrained(path).state_dict())
        return {"kind": "diffusers", "path": str(Path(path).resolve())}
    root, tag = store.resolve(path)
    meta = store.read_meta(root, tag)
    ema = cfg.train.init_weights == "ema"
    if meta.get("lora"):  # a LoRA run's tag: its base with the adapters folded in
        load_weights(model, merged_weights(root, tag, ema))
    else:
        load_weights(model, store.load_weights(root, tag, ema=ema))
    return {"kind": "checkpoint", "path": str((root / tag).resolve()), "run": str(root.parent.resolve()),
            "tag": tag, "step": meta["step"], "weights": cfg.train.init_weights,
            "stage": meta["config"]["train"].get("stage", "?")}


def lora_base(model, cfg: Config) -> dict:
    """What a LoRA run records of its frozen base (meta.json "lora"): where it came from (train.init_from,
    else model.pretrained, else the random init of model.preset from run.seed) and `base_sha256`. Call it
    before the adapters are applied. Collective when torch.distributed is up: rank 0 hashes, the others
    receive its digest (every rank builds the same base)."""
    source = source_of(cfg)
    base = str(Path(source).resolve()) if source else f"random init (model.preset={cfg.model.preset}, run.seed={cfg.run.seed})"
    if cfg.train.init_from and not is_diffusers_folder(cfg.train.init_from):
        base += f" ({cfg.train.init_weights} weights)"
    distributed = dist.is_available() and dist.is_initialized()
    box = [weights_sha256(model) if not distributed or dist.get_rank() == 0 else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    return {"base": base, "base_sha256": box[0]}


def weights_sha256(model) -> str:
    """tensors_sha256 of the model's parameters, copied to the CPU one tensor at a time. Cost: one pass over the
    weights' bytes at hashlib's ~1-2 GB/s on one core: an 8B-parameter base hashed in fp32 (32 GB, as training
    does on the host before DeepSpeed casts it) takes ~20-30 s on rank 0, once per start; the tiny preset
    milliseconds."""
    return tensors_sha256(dict(model.named_parameters()))


def require_base(meta: dict) -> None:
    """Refuse, before anything is built, a LoRA run whose base folder or run is no longer where it was (`meta`:
    the tag's meta.json, whose config is not parsed yet: parsing checks model.pretrained's folder)."""
    stored = meta["config"]
    source = stored.get("train", {}).get("init_from") or stored.get("model", {}).get("pretrained")
    if source and not Path(source).exists():
        raise CheckpointError(f"the base of this LoRA run is gone: {source} does not exist (recorded: "
                              f"{meta['lora'].get('base')}). Put it back, or apply the exported adapter to a copy of "
                              f"the base elsewhere: t2i ckpt export RUN --out DIR; t2i sample --ckpt BASE --lora DIR")


def base_model(cfg: Config, meta: dict, text=None, vae=None) -> torch.nn.Module:
    """The frozen base of the LoRA run whose tag's meta.json is `meta`, built as training built it, fp32, CPU.
    With `text` and `vae` through t2i's model builder (what sampling needs anyway); without them from the
    recorded transformer config (no text encoder is loaded: the export). Refused unless its content hash is
    the recorded one."""
    recorded = meta["lora"]
    source = source_of(cfg)
    if text is not None and vae is not None or not source or "transformer" not in meta:
        from t2i.models.build import build_for, build_frozen

        if text is None or vae is None:
            text, vae = build_frozen(cfg)
        model = build_for(cfg, text, vae)
    elif cfg.model.pretrained:
        model = load_pretrained(cfg.model.pretrained)
    else:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_config(meta["transformer"])
    if cfg.train.init_from:
        init_from_parent(model, cfg)
    digest = weights_sha256(model)
    if digest != recorded.get("base_sha256"):
        raise CheckpointError(f"the base rebuilt from {source or 'model.preset'} has sha256 {digest}, not the "
                              f"{recorded.get('base_sha256')} the LoRA run trained on ({recorded.get('base')}): the "
                              f"folder or run changed since. Restore it, or pass the run's base explicitly with "
                              f"an exported adapter: t2i sample --ckpt BASE --lora ADAPTER")
    return model.float().eval()


def adapter_weights(root: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """The tag's adapters (the EMA, or the raw fp32 weights from the optimizer partitions), keyed as peft's
    state dict without the adapter name."""
    from t2i.models.lora import peft_keys

    weights = peft_keys(store.load_weights(root, tag, ema=ema))
    if not weights or any(t.numel() == 0 for t in weights.values()):
        raise CheckpointError(f"{root / tag} holds no adapter values ({len(weights)} tensors"
                              f"{', some empty' if weights else ''}); is it a LoRA run's checkpoint?")
    return weights


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over name, dtype, shape and bytes of each tensor, in sorted name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def adapted(root: Path, tag: str, ema: bool = True, text=None, vae=None) -> tuple[Config, torch.nn.Module, AdapterInfo]:
    """(config, base + the tag's adapters in eval mode, what a manifest records) of a LoRA run's tag."""
    from t2i.models import lora

    meta = store.read_meta(root, tag)
    if not meta.get("lora"):
        raise CheckpointError(f"{root / tag} is not a LoRA run's checkpoint (no \"lora\" in its meta.json)")
    require_base(meta)
    cfg = from_dict(meta["config"])
    weights = adapter_weights(root, tag, ema)
    model = base_model(cfg, meta, text, vae)
    lo = cfg.lora
    names = lora.apply(model, lo.rank, lo.alpha, lo.targets, lo.blocks, lo.dropout, lo.init)
    lora.load_adapter(model, weights)
    info = AdapterInfo(base=meta["lora"]["base"], base_sha256=meta["lora"]["base_sha256"],
                       adapter=f"{root / tag} ({'ema' if ema else 'raw'})", adapter_sha256=tensors_sha256(weights),
                       rank=lo.rank, alpha=float(lo.alpha or lo.rank), modules=len(names))
    return cfg, model.eval(), info


def run_lora_config(cfg: Config, meta: dict):
    """The peft LoraConfig a run's adapters were injected with, from its config and the transformer config its
    tags record (the module names resolved on a model built on the meta device: no weights read)."""
    from diffusers import SD3Transformer2DModel

    from t2i.models import lora

    if "transformer" not in meta:
        raise CheckpointError("the tag's meta.json records no transformer config")
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(meta["transformer"])
    lo = cfg.lora
    names = lora.target_names(model, lo.targets, lo.blocks)
    return lora.lora_config(lo.rank, lo.alpha, names, lo.dropout, lo.init)


def merged_weights(root: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """The full weights of a LoRA run's tag: its base with the adapters folded in (for train.init_from)."""
    from t2i.models import lora

    _, model, _ = adapted(root, tag, ema)
    lora.merge(model)
    return model.state_dict()


def apply_file(model: torch.nn.Module, path, base: str = "") -> AdapterInfo:
    """Inject the adapter of a diffusers LoRA file (or a folder holding pytorch_lora_weights.safetensors) into
    `model` with the file's LoraConfig (its alpha included), load its tensors and check that every one arrived
    with its value. Safetensors only (t2i.checkpoint.lora_export.read_lora refuses pickles)."""
    import peft
    from peft.utils import set_peft_model_state_dict

    from t2i.checkpoint.lora_export import check_loaded, read_lora, weight_file
    from t2i.models.lora import ADAPTER_NAME, has_adapter

    file = weight_file(path)
    state, config = read_lora(file)
    if has_adapter(model):
        raise CheckpointError(f"--lora {path}: the model already has a LoRA adapter")
    base_sha256 = weights_sha256(model)
    modules = sorted({k.split(".lora_")[0] for k in state})
    missing = [m for m in modules if not _has_module(model, m)]
    if missing:
        raise CheckpointError(f"--lora {file}: {len(missing)} of its {len(modules)} modules are not in the model "
                              f"(first {missing[0]!r}): an adapter of another model?")
    try:
        lora_cfg = peft.LoraConfig(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"--lora {file}: its adapter metadata does not build a LoraConfig ({e})") from None
    peft.inject_adapter_in_model(lora_cfg, model, adapter_name=ADAPTER_NAME)
    try:
        set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        check_loaded(model, state, ADAPTER_NAME)
    except RuntimeError as e:  # a shape that does not fit the layer
        raise CheckpointError(f"--lora {file} does not fit the model: {str(e).splitlines()[0]}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return AdapterInfo(base=base, base_sha256=base_sha256, adapter=str(file), adapter_sha256=tensors_sha256(state),
                       rank=int(config["r"]), alpha=float(config["lora_alpha"]), modules=len(modules),
                       adapter_file_sha256=file_sha256(file))


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True

