"""t2i bench's LoRA side: adapters on the model-step variants, what the optimizer holds, the bytes of one
saved checkpoint tag, and the "LoRA vs full" table.

    t2i bench --in-process --repeats 3 --ckpt-bytes --variants zero2,zero2+lora.rank=16
    t2i bench --in-process --repeats 3 --ckpt-bytes --variants t2i,t2i+lora.rank=16,zero2,zero2+lora.rank=16

A variant whose config has `lora.rank > 0` (an override after `+`, or for every variant on the command line)
trains LoRA adapters with everything else frozen, as a LoRA training run does (t2i/models/lora.py,
docs/design/lora.md): the full-step variants (t2i, mixflow, cache) through pipelines/train.py itself, the
model-step variants (zero1..3, ddp, bare) by `lora.apply` after the model is built and an optimizer over
the adapter parameters only. Each row records the base model's parameters, the ones it trains and, for the
model-step variants, the elements the optimizer really holds (DeepSpeed's parameter groups).

--ckpt-bytes: after its measured steps (first round only), each DeepSpeed variant saves one tag and reports
its bytes, then deletes it: the model-step variants through t2i's checkpoint store (DeepSpeed's model and
optimizer files, exclude_frozen_parameters for LoRA as t2i's Checkpointer does; no EMA), the full-step
variants through the training run's own Checkpointer (with the EMA: of the adapters only for LoRA).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

MB = 1e6


def rank_of(cfg) -> int:
    return int(getattr(getattr(cfg, "lora", None), "rank", 0) or 0)


def apply(model, cfg) -> int:
    """lora.rank > 0: inject the configured adapters (everything else frozen), as pipelines/train.py does after
    the model is built. Returns the number of adapted layers (0: full fine-tuning, nothing changed)."""
    if not rank_of(cfg):
        return 0
    from t2i.models import lora

    lo = cfg.lora
    names = lora.apply(model, lo.rank, lo.alpha, lo.targets, lo.blocks, lo.dropout, lo.init)
    lora.buffers_out_of_state_dict(model)  # the tags hold the adapters only, as training's
    return len(names)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def counts(model) -> dict:
    """Parameters of the base model (without adapters) and the trained ones; call before ZeRO-3 partitions."""
    from t2i.models import lora

    adapters = sum(p.numel() for p in lora.adapter_parameters(model))
    return {"base_params": sum(p.numel() for p in model.parameters()) - adapters,
            "trained_params": sum(p.numel() for p in trainable(model))}


def optimizer_numel(optimizer) -> int:
    """Elements of the model parameters an optimizer updates, over all ranks: DeepSpeed's ZeRO-1/2 keep them in
    `bit16_groups`, ZeRO-3 in `fp16_groups` (ds_numel: the full size of a partitioned parameter), a torch
    optimizer in its param_groups."""
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None) \
        or [g["params"] for g in optimizer.param_groups]
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for group in groups for p in group)


def meta_counts(cfg, shapes: dict) -> dict:
    """`counts` for a full-step variant, whose model lives inside pipelines/train.py: the same model built on the
    meta device (no memory, no weights) from the preset or the model.pretrained folder's config, and
    lora.adapter_size for the adapters."""
    import torch
    from diffusers import SD3Transformer2DModel

    from t2i.models import lora
    from t2i.models.mmdit import preset_kwargs

    with torch.device("meta"):
        model = SD3Transformer2DModel(**(pretrained_kwargs(cfg) or preset_kwargs(cfg.model, **shapes)))
    total = sum(p.numel() for p in model.parameters())
    if not rank_of(cfg):
        return {"base_params": total, "trained_params": total, "lora_modules": 0}
    size = lora.adapter_size(model, cfg.lora.rank, cfg.lora.targets, cfg.lora.blocks)
    return {"base_params": total, "trained_params": size.parameters, "lora_modules": size.modules}


def tag_bytes(tag_dir: Path) -> dict:
    """Bytes of one checkpoint tag by kind: DeepSpeed's model file(s), its optimizer partitions, the rest (t2i's
    per-rank client state with the EMA, meta.json)."""
    out = {"model": 0, "optimizer": 0, "other": 0, "files": 0}
    for f in Path(tag_dir).rglob("*"):
        if f.is_file():
            kind = "optimizer" if "optim_states" in f.name else "model" if "model_states" in f.name else "other"
            out[kind] += f.stat().st_size
            out["files"] += 1
    out["total"] = out["model"] + out["optimizer"] + out["other"]
    return out


def save_and_measure(engine, out: Path, spec: str, repeat: int, step: int, cfg) -> dict | None:
    """Collective (every rank): save one tag of a model-step variant with t2i's store (exclude_frozen for LoRA,
    as the Checkpointer), measure it on rank 0, delete it. Returns the bytes on rank 0, None elsewhere."""
    import torch.distributed as dist

    from t2i.checkpoint import store

    root = Path(out) / "ckpt" / f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', spec)[:80]}-r{repeat}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    tag, _ = store.save(engine, root, step, {"step": step},
                        {"world_size": dist.get_world_size(), "zero_stage": cfg.deepspeed.zero_stage, "bench": spec},
                        exclude_frozen=rank_of(cfg) > 0)
    measured = tag_bytes(root / tag) if rank == 0 else None
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        try:
            root.parent.rmdir()  # <out>/ckpt, once empty
        except OSError:
            pass
    return measured


def measure_run_tag(run_dir: Path) -> dict | None:
    """Bytes of the tag a full-step variant's training run saved at its last step (rank 0; then deleted)."""
    from t2i.checkpoint import store

    root = Path(run_dir) / "checkpoints"
    tag = store.latest_pointer(root) if root.is_dir() else None
    if not tag:
        return None
    measured = tag_bytes(root / tag)
    shutil.rmtree(root, ignore_errors=True)
    return measured


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _ckpt_by_spec(results: list[dict]) -> dict:
    """Tag bytes per (spec, ckpt, compile): measured in the first round only."""
    out = {}
    for r in results:
        if r.get("ckpt_bytes"):
            out.setdefault((r.get("spec", r["variant"]), r["ckpt"], r["compile"]), r["ckpt_bytes"])
    return out


def full_spec(spec: str) -> str:
    """`zero2+lora.rank=16+deepspeed.overlap_comm=false` -> `zero2+deepspeed.overlap_comm=false`: the variant
    without its lora.* overrides, the full fine-tuning a LoRA variant is compared with."""
    return "+".join(p for i, p in enumerate(spec.split("+")) if i == 0 or not p.startswith("lora."))


def pairs(results: list[dict], key) -> list[tuple]:
    """(LoRA key, full key) for every LoRA variant whose form without lora.* overrides ran without LoRA."""
    have = {key(r): r for r in results}
    out = []
    for k, r in have.items():
        if r.get("lora_rank"):
            base = (full_spec(k[0]), k[1], k[2])
            if base in have and not have[base].get("lora_rank") and (k, base) not in out:
                out.append((k, base))
    return out


def markdown(results: list[dict], rows: list[dict], key, round_ratio) -> list[str]:
    """The "LoRA vs full" tables: per variant what is trained, the optimizer step and the tag bytes; per LoRA
    variant against its plain form the ratios (step and CPU time: the median of the per-round ratios, as every
    ratio of t2i bench; optimizer step: the same over the rounds' mean `step` phase). Empty without LoRA rows."""
    if not any(r.get("lora_rank") for r in results):
        return []
    ckpt = _ckpt_by_spec(results)

    def mb(b):
        return f"{b['total'] / MB:.2f} ({b['model'] / MB:.2f} + {b['optimizer'] / MB:.2f} + {b['other'] / MB:.2f})" \
            if b else "-"

    lines = ["", "LoRA vs full fine-tuning. Trained: the parameters the optimizer updates (model-step variants: "
             "counted in the optimizer itself). "
             + ("Checkpoint: one saved tag, MB = model file(s) + optimizer partitions + t2i's client state (RNG, "
                "data position, EMA) and meta.json." if ckpt else "Checkpoint bytes: run with --ckpt-bytes."), "",
             "| variant | trained | trained params | of the base | optimizer step ms |"
             + (" checkpoint MB (model + optimizer + other) |" if ckpt else ""),
             "|---|---|---:|---:|---:|" + ("---|" if ckpt else "")]
    for r in rows:
        k = key(r)
        what = f"LoRA r{r['lora_rank']}" + (f" ({r['lora_modules']} layers)" if r.get("lora_modules") else "") \
            if r.get("lora_rank") else "all"
        n, total = r.get("trained_params"), r.get("base_params")
        share = f"{100 * n / total:.2f} %" if n and total else "-"
        lines.append(f"| {k[0]} | {what} | {f'{n:,}' if n else '-'} | {share} | "
                     f"{r['phases_ms'].get('step', 0.0):.2f} |" + (f" {mb(ckpt.get(k))} |" if ckpt else ""))
    flat = [dict(r, step_phase_ms=r["phases_ms"].get("step")) for r in results]
    by_row = {key(r): r for r in rows}
    ratio_lines = []
    for lo, full in pairs(results, key):
        step = round_ratio(results, lo, full)
        if step is None:  # no round with both
            continue
        cpu = round_ratio(results, lo, full, "cpu_ms_median")
        opt = round_ratio(flat, lo, full, "step_phase_ms")
        a, b = ckpt.get(lo), ckpt.get(full)
        params = by_row[lo].get("trained_params"), by_row[full].get("trained_params")
        spread = f"{step[1]:.3f}-{step[2]:.3f} ({step[3]} rounds)" if step[3] > 1 else "-"
        tags = (f"{a['total'] / b['total']:.4f} ({b['total'] / a['total']:.0f}x smaller)" if a and b else "-")
        ratio_lines.append(f"| {lo[0]} / {full[0]} | {step[0]:.3f} | {spread} | {_f(cpu)} | {_f(opt)} | "
                           + (f"{tags} | " if ckpt else "")
                           + (f"{params[0] / params[1]:.4f}" if all(params) else "-") + " |")
    if ratio_lines:
        lines += ["", "| LoRA / full | step time (median of rounds) | rounds: min-max | CPU time | optimizer step | "
                  + ("checkpoint bytes | " if ckpt else "") + "trained params |",
                  "|---|---:|---|---:|---:|" + ("---|" if ckpt else "") + "---:|", *ratio_lines]
    return lines


def _f(r, digits: int = 3) -> str:
    return "-" if not r else f"{r[0]:.{digits}f}"


def pretrained_kwargs(cfg) -> dict | None:
    """The SD3Transformer2DModel arguments of a model.pretrained folder (its transformer/config.json), else None."""
    if not cfg.model.pretrained:
        return None
    root = Path(cfg.model.pretrained)
    path = root / "transformer" / "config.json"
    path = path if path.is_file() else root / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
