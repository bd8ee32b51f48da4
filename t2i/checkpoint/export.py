"""A checkpoint as files other software loads: consolidated safetensors and diffusers folders.

    consolidate(root, tag, out, weights)   <out>/raw.safetensors   full fp32 raw weights (DeepSpeed's
                                                                   zero_to_fp32 over the fp32 partitions)
                                           <out>/ema.safetensors   full fp32 EMA (each rank's slice read once,
                                                                   memory-mapped: store.load_weights)
                                           <out>/consolidated.json provenance: tag, step, world size,
                                                                   ZeRO stage, EMA decay/updates, config
    export_diffusers(root, tag, out, ...)  <out>/transformer/      SD3Transformer2DModel.from_pretrained
                                           <out>/config.yaml       the run's resolved config
                                           <out>/t2i_export.json   provenance and what the folder holds
                                           with pipeline=True also text_encoder{,_2,_3}/, tokenizer{,_2,_3}/,
                                           vae/, scheduler/, model_index.json: a StableDiffusion3Pipeline

A full pipeline needs diffusers components: text.preset=sd3 with text.sd3_folder (the frozen text
encoders and tokenizers are copied from it unchanged) and vae.kind=pretrained. The tiny CPU config's
text towers (random open_clip towers + a byte-level T5, seed text.seed) and its identity VAE (pixel
space) are not diffusers components: for it only transformer/ is exported, plus config.yaml, from
which t2i rebuilds those frozen parts (`t2i sample --ckpt <out> --config <out>/config.yaml`).
Single process, CPU; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from t2i.checkpoint import store
from t2i.config import Config, from_dict, save_config
from t2i.errors import CheckpointError
from t2i.io import atomic_write, write_json

PIPELINE_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def provenance(root: Path, tag: str) -> dict:
    meta = store.read_meta(root, tag)
    return {"source": str((root / tag).resolve()), "tag": tag, "step": meta["step"],
            "world_size": meta["world_size"], "zero_stage": meta.get("zero_stage"), "saved": meta.get("time"),
            "config": meta["config"]}


def save_safetensors(weights: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {n: t.detach().float().contiguous() for n, t in weights.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def consolidate(root: Path, tag: str, out: Path, weights: str = "both") -> dict:
    """Write <out>/{raw,ema}.safetensors and <out>/consolidated.json; returns the JSON's content."""
    if weights not in ("raw", "ema", "both"):
        raise CheckpointError(f"weights must be raw, ema or both, got {weights!r}")
    out.mkdir(parents=True, exist_ok=True)
    info = provenance(root, tag)
    info["files"] = {}
    for kind in (("raw", "ema") if weights == "both" else (weights,)):
        tensors = store.load_weights(root, tag, ema=kind == "ema")
        name = f"{kind}.safetensors"
        save_safetensors(tensors, out / name, {"tag": tag, "step": info["step"], "weights": kind})
        info["files"][kind] = {"file": name, "tensors": len(tensors), "parameters": sum(t.numel() for t in
                                                                                         tensors.values())}
    if weights != "raw":
        ema = store.read_client_state(root, tag, 0, mmap=True)["ema"]
        info["ema"] = {"decay": ema["decay"], "updates": ema["updates"]}
    write_json(out / "consolidated.json", info, indent=1)
    return info


def build_transformer(root: Path, tag: str, ema: bool):
    """The SD3Transformer2DModel of a checkpoint with its EMA or raw weights (fp32, CPU, eval); a LoRA run's:
    its base with the adapters merged in (t2i.checkpoint.parents)."""
    from diffusers import SD3Transformer2DModel

    from t2i.models.mmdit import load_weights

    meta = store.read_meta(root, tag)
    if meta.get("lora"):
        from t2i.checkpoint import parents
        from t2i.models import lora

        _, model, _ = parents.adapted(root, tag, ema)
        lora.merge(model)
        return model.float().eval()
    if "transformer" in meta:  # the constructor arguments, recorded at save time
        model = SD3Transformer2DModel.from_config(meta["transformer"])
    else:  # older checkpoints: rebuild the frozen parts to learn the widths
        from t2i.models import build
        cfg = from_dict(meta["config"])
        model = build.build_for(cfg, *build.build_frozen(cfg))
    load_weights(model, store.load_weights(root, tag, ema=ema))
    return model.float().eval()


def export_diffusers(root: Path, tag: str, out: Path, ema: bool = True, pipeline: bool = False,
                     dtype: str = "float32") -> dict:
    """Write a diffusers folder (see the module docstring); returns t2i_export.json's content. `dtype`:
    the saved transformer's (float32 | bfloat16 | float16); diffusers loads it in fp32 unless given
    `torch_dtype=` (e.g. StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.bfloat16))."""
    cfg = from_dict(store.read_meta(root, tag)["config"])
    if pipeline:
        check_pipeline_parts(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model = build_transformer(root, tag, ema)  # fp32
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.save_pretrained(out / "transformer", safe_serialization=True)
    lora = store.read_meta(root, tag).get("lora")
    # a merged LoRA run is a full model: its config.yaml says so (lora.rank 0), the tag's meta.json keeps the run's
    save_config(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0)) if lora else cfg,
                out / "config.yaml")
    info = provenance(root, tag)
    info["weights"] = "ema" if ema else "raw"
    info["dtype"] = dtype
    if lora:
        info["lora"] = {**lora, "merged": True}
    if pipeline:
        write_pipeline_parts(cfg, out)
        info["contents"] = "StableDiffusion3Pipeline folder: transformer from the checkpoint; text encoders, " \
                           "tokenizers and VAE copied unchanged from the run's frozen components"
    else:
        info["contents"] = ("transformer/ only (SD3Transformer2DModel). The run's text encoders "
                            f"(text.preset={cfg.text.preset}) and VAE (vae.kind={cfg.vae.kind}) are rebuilt by "
                            "t2i from config.yaml" + ("" if pipeline_capable(cfg) else
                                                      "; they are not diffusers components, so no pipeline"))
    write_json(out / "t2i_export.json", info, indent=1)
    return info


def export_lora(root: Path, tag: str, out: Path, ema: bool = True) -> dict:
    """A LoRA run's adapters as diffusers' pytorch_lora_weights.safetensors (with the adapter metadata, so alpha
    survives) and t2i_lora.json (t2i.checkpoint.lora_export); returns the sidecar's content. The base is not
    read: the adapters come from the tag, the module names from the transformer config it records."""
    from t2i.checkpoint import lora_export, parents

    meta = store.read_meta(root, tag)
    if not meta.get("lora"):
        raise CheckpointError(f"{root / tag} is a full fine-tuning checkpoint, not a LoRA run's (no \"lora\" in "
                              f"its meta.json): `t2i ckpt export RUN --out DIR` writes its transformer")
    cfg = from_dict(meta["config"])
    weights = parents.adapter_weights(root, tag, ema)
    config = parents.run_lora_config(cfg, meta)
    record = {**meta["lora"], "adapter_sha256": parents.tensors_sha256(weights), **provenance(root, tag),
              "weights": "ema" if ema else "raw"}
    record.pop("config")
    lora_export.write_diffusers_lora(weights, config, out, provenance=record)
    return json.loads((out / lora_export.SIDECAR).read_text())


def pipeline_capable(cfg: Config) -> bool:
    t = cfg.text
    return t.preset == "sd3" and bool(t.sd3_folder) and not (t.clip_l or t.clip_g or t.t5) \
        and cfg.vae.kind == "pretrained"


def check_pipeline_parts(cfg: Config) -> None:
    if not pipeline_capable(cfg):
        raise CheckpointError(
            "--pipeline needs the run's frozen parts in diffusers form: text.preset=sd3 with text.sd3_folder "
            "(and no clip_l/clip_g/t5 overrides) and vae.kind=pretrained; this run has "
            f"text.preset={cfg.text.preset}, vae.kind={cfg.vae.kind} (export without --pipeline writes transformer/)")
    folder = Path(cfg.text.sd3_folder)
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"text.sd3_folder={folder} has no {part}/")


def write_pipeline_parts(cfg: Config, out: Path) -> None:
    """Text encoders, tokenizers, VAE, scheduler and model_index.json next to <out>/transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from t2i.models.text_encoders import CLIP_G_PAD, CLIP_L_PAD, clip_tokenizer

    folder = Path(cfg.text.sd3_folder)
    for part in PIPELINE_PARTS:
        if (folder / part).is_dir():
            shutil.copytree(folder / part, out / part, dirs_exist_ok=True)
    for part, pad in (("tokenizer", CLIP_L_PAD), ("tokenizer_2", CLIP_G_PAD)):  # what t2i used without them
        if not (out / part).is_dir():
            clip_tokenizer(pad).save_pretrained(out / part)
    vae = Path(cfg.vae.path)
    shutil.copytree(vae / "vae" if (vae / "vae" / "config.json").is_file() else vae, out / "vae", dirs_exist_ok=True)
    if (folder / "scheduler").is_dir():
        shutil.copytree(folder / "scheduler", out / "scheduler", dirs_exist_ok=True)
    else:
        FlowMatchEulerDiscreteScheduler(shift=cfg.sample.shift).save_pretrained(out / "scheduler")
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {
        "_class_name": "StableDiffusion3Pipeline",
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", _tokenizer_class(out / "tokenizer_3")]}
    import diffusers
    index.update({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
                  "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    write_json(out / "model_index.json", index)


def _tokenizer_class(folder: Path) -> str:
    config = folder / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    return name or "T5TokenizerFast"
