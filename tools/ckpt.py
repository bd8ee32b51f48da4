"""Checkpoint tools: list, consolidate to safetensors, export a diffusers folder, make a universal checkpoint.

    t2i ckpt list RUN                                             tags: step, ranks, ZeRO stage, complete?, latest
    t2i ckpt consolidate RUN_OR_TAG --out DIR [--weights raw|ema|both]
                                  -> DIR/raw.safetensors, DIR/ema.safetensors, DIR/consolidated.json
    t2i ckpt export RUN_OR_TAG --out DIR [--weights ema|raw] [--pipeline] [--dtype float32|bfloat16|float16]
                                  -> DIR/transformer/ (SD3Transformer2DModel.from_pretrained), config.yaml,
                                     t2i_export.json; --pipeline: a StableDiffusion3Pipeline folder
                                  a LoRA run -> DIR/pytorch_lora_weights.safetensors (pipe.load_lora_weights(DIR)),
                                     DIR/t2i_lora.json; with --merge the full folder above, adapters fused
    t2i ckpt universal RUN_OR_TAG -> <tag>/universal/ (DeepSpeed universal checkpoint), what a resume
                                     at another world size makes by itself; do it ahead for big models

RUN_OR_TAG is a run folder or its checkpoints/ folder (both mean `latest`) or a tag folder. Single
process, CPU; DeepSpeed is used only to read its files. Details in t2i/checkpoint/export.py and t2i/checkpoint/store.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from t2i.cmdline import HelpFormatter, parser as make_parser
from t2i.errors import CheckpointError


def parser() -> argparse.ArgumentParser:
    p = make_parser("ckpt", __doc__)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("list", help="the run's checkpoint tags",
                       formatter_class=HelpFormatter)
    s.add_argument("run", help="run folder or its checkpoints/ folder")
    s = sub.add_parser("consolidate", help="full fp32 raw and/or EMA weights as safetensors",
                       formatter_class=HelpFormatter)
    s.add_argument("ckpt", help="run folder, checkpoints/ (latest) or a tag folder")
    s.add_argument("--out", required=True)
    s.add_argument("--weights", choices=["raw", "ema", "both"], default="both")
    s = sub.add_parser("export", help="a diffusers folder (transformer/, or a full pipeline with --pipeline)",
                       formatter_class=HelpFormatter)
    s.add_argument("ckpt", help="run folder, checkpoints/ (latest) or a tag folder")
    s.add_argument("--out", required=True)
    s.add_argument("--weights", choices=["ema", "raw"], default="ema")
    s.add_argument("--pipeline", action="store_true",
                   help="also text encoders, tokenizers, VAE, scheduler (needs text.preset=sd3 + vae.kind=pretrained)")
    s.add_argument("--merge", action="store_true",
                   help="a LoRA run: its base with the adapters fused, written as a full transformer/ folder "
                        "(with --pipeline a full pipeline) instead of the adapter file")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved transformer (default float32; bfloat16 halves the files). diffusers "
                        "loads any of them in fp32 unless given from_pretrained(..., torch_dtype=torch.bfloat16)")
    s = sub.add_parser("universal", help="convert a tag to DeepSpeed's universal checkpoint (<tag>/universal)",
                       formatter_class=HelpFormatter)
    s.add_argument("ckpt", help="run folder, checkpoints/ (latest) or a tag folder")
    s.add_argument("--workers", type=int, default=None, help="ds_to_universal extract/merge workers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from t2i.checkpoint import export, store

    if args.action == "list":
        return list_tags(Path(args.run))
    root, tag = store.resolve(args.ckpt)
    if args.action == "consolidate":
        info = export.consolidate(root, tag, Path(args.out), args.weights)
        print(f"{root / tag} (step {info['step']}): " + ", ".join(
            f"{k} -> {Path(args.out) / v['file']}" for k, v in info["files"].items()))
    elif args.action == "export":
        lora = bool(store.read_meta(root, tag).get("lora"))
        if args.merge and not lora:
            raise CheckpointError(f"--merge: {root / tag} is a full fine-tuning checkpoint, not a LoRA run's; "
                                  "export it without --merge")
        if lora and not args.merge:
            if args.pipeline or args.dtype != "float32":
                raise CheckpointError(f"{root / tag} is a LoRA run's: it exports as an adapter file (fp32, as "
                                      "trained); --pipeline and --dtype apply with --merge (a full folder)")
            info = export.export_lora(root, tag, Path(args.out), ema=args.weights == "ema")
            print(f"{root / tag} (step {info['provenance']['step']}, {args.weights}) -> {Path(args.out) / info['file']}"
                  f": LoRA rank {info['r']} (alpha {info['lora_alpha']}), {info['modules']} modules, "
                  f"{info['tensors']} tensors, {info['parameters']:,} parameters; load it with "
                  f"StableDiffusion3Pipeline.load_lora_weights({args.out!r}) on the base {info['provenance']['base']}")
            return 0
        info = export.export_diffusers(root, tag, Path(args.out), ema=args.weights == "ema",
                                       pipeline=args.pipeline, dtype=args.dtype)
        print(f"{root / tag} (step {info['step']}, {info['weights']}) -> {args.out}: {info['contents']}"
              + (" (LoRA adapters merged into the base)" if lora else ""))
    elif args.action == "universal":
        print(store.ensure_universal(root, tag, workers=args.workers))
    return 0


def list_tags(path: Path) -> int:
    from t2i.checkpoint import store

    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(f"{path}: no checkpoints folder")
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    for tag in store.complete_tags(root):
        meta = store.read_meta(root, tag)
        flags = ["latest"] * (tag == latest) + ["universal"] * (root / tag / store.UNIVERSAL).is_dir()
        print(f"{tag}  step {meta['step']}  {meta['world_size']} rank(s)  ZeRO-{meta.get('zero_stage', '?')}  "
              f"complete {' '.join(flags)}".rstrip())
    for tag in store.incomplete_tags(root):
        print(f"{tag}  INCOMPLETE (no meta.json: a save that did not finish; ignored by --resume)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
