"""Per-rank memory of a training run, computed from parameter counts (no weights are read).

    python -m tools.memory_table                      # SD3.5-medium and -large, 8 and 16 ranks, ZeRO-2/3
    python -m tools.memory_table --ranks 8 16 32 --presets sd3.5-large
    python -m tools.memory_table --folder /weights/stable-diffusion-3.5-medium   # counts from your folder

Bytes per parameter (bf16 training with DeepSpeed, AdamW):

    transformer buffers, B elements     the positional-embedding table (SD3.5-medium: 226M, large: 90M):
                                        bf16 on every rank (no ZeRO stage shards buffers), fp32 at start-up
    trainable transformer, P params     bf16 weights 2P, bf16 gradients 2P, fp32 master 4P, Adam m + v 8P
                                        ZeRO-1: master + Adam / N;  ZeRO-2: + gradients / N;
                                        ZeRO-3: + weights / N (a layer is gathered while it runs)
    t2i's EMA (fp32)                    4P / N: each rank holds the slice of the master it owns
    frozen encoders, bf16               CLIP-L 123.7M + OpenCLIP-bigG 694.7M + T5-XXL encoder 4.76B params, 2 bytes
                                        each, on every rank (encoders are not sharded)
    frozen VAE, fp32                    83.7M params (kept in fp32: SD3's VAE config sets force_upcast)

Activations are left out (they depend on batch, resolution and activation checkpointing; measure them
with `t2i bench`). Host RAM at start-up is what one rank holds while it loads on a GPU node: the
transformer in fp32 before DeepSpeed moves it to its device (the encoders are read straight to the
device in their target dtype, each once; the VAE is small).

`--folder` counts every component's parameters from a local diffusers folder's config files (built on
the meta device, no weights read) instead of the release numbers above. tests/test_memory_table.py
checks the start-up column against the peak RSS measured while a rank loads a release-shaped folder.
"""

from __future__ import annotations

import argparse

GB = 1e9
ENCODERS = {"clip_l": 123.65e6, "clip_g": 694.66e6, "t5_xxl_encoder": 4.762e9}
VAE = 83.65e6


def transformer_params(preset: str) -> tuple[int, int]:
    """Exact parameter and buffer counts of a preset, built on the meta device (no memory)."""
    import torch

    from t2i.config import ModelConfig
    from t2i.models.mmdit import preset_kwargs

    from diffusers import SD3Transformer2DModel

    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128, joint_attention_dim=4096,
                           pooled_projection_dim=2048)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def folder_params(folder: str) -> dict[str, int]:
    """Parameter count of each component of a diffusers SD3/SD3.5 folder, from its config files alone, and the
    transformer's buffer elements ("transformer_buffers")."""
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

    root = Path(folder)
    builders = {"transformer": lambda d: SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(d)),
                "vae": lambda d: AutoencoderKL.from_config(AutoencoderKL.load_config(d)),
                "text_encoder": lambda d: CLIPTextModelWithProjection(AutoConfig.from_pretrained(d)),
                "text_encoder_2": lambda d: CLIPTextModelWithProjection(AutoConfig.from_pretrained(d)),
                "text_encoder_3": lambda d: T5EncoderModel(AutoConfig.from_pretrained(d))}
    counts = {}
    for sub, build in builders.items():
        with torch.device("meta"):
            module = build(str(root / sub))
        counts[sub] = sum(p.numel() for p in module.parameters())
        if sub == "transformer":
            counts["transformer_buffers"] = sum(b.numel() for b in module.buffers())
    return counts


def per_rank_gb(p: float, ranks: int, stage: int, encoders: float | None = None, vae: float = VAE,
                buffers: float = 0) -> dict:
    """GB per rank for a P-parameter transformer with `buffers` buffer elements (not sharded by any ZeRO
    stage); `encoders` / `vae`: frozen parameter counts (release's by default), the encoders held in bf16
    and the VAE in fp32."""
    encoders = sum(ENCODERS.values()) if encoders is None else encoders
    weights = 2 * p / (ranks if stage == 3 else 1) + 2 * buffers
    grads = 2 * p / (ranks if stage >= 2 else 1)
    optimizer = 12 * p / ranks
    ema = 4 * p / ranks
    frozen = 2 * encoders + 4 * vae
    gpu = weights + grads + optimizer + ema + frozen
    host = 4 * (p + buffers) + 4 * vae  # start-up peak of one rank on a GPU: encoders are read straight to the device
    return {"weights": weights / GB, "grads": grads / GB, "optimizer": optimizer / GB, "ema": ema / GB,
            "frozen": frozen / GB, "gpu": gpu / GB, "host_startup": host / GB,
            "checkpoint_per_rank": (optimizer + ema + (2 * p / ranks)) / GB}


def table(presets: list[str], ranks: list[int], stages: list[int], folder: str | None = None) -> str:
    lines = ["| model | params | ranks | ZeRO | weights | grads | master+Adam | EMA | encoders+VAE | GPU per rank "
             "(no activations) | host RAM per rank at start-up | per node (8 ranks) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(preset, *transformer_params(preset), None, VAE) for preset in presets]
    if folder:
        counts = folder_params(folder)
        rows = [(folder, counts["transformer"], counts["transformer_buffers"],
                 sum(counts[f"text_encoder{s}"] for s in ("", "_2", "_3")), counts["vae"])]
    for preset, p, buffers, encoders, vae in rows:
        for n in ranks:
            for stage in stages:
                m = per_rank_gb(p, n, stage, encoders, vae, buffers)
                lines.append(f"| {preset} | {p / 1e9:.2f}B | {n} | {stage} | {m['weights']:.1f} | {m['grads']:.1f} | "
                             f"{m['optimizer']:.1f} | {m['ema']:.1f} | {m['frozen']:.1f} | **{m['gpu']:.1f}** | "
                             f"{m['host_startup']:.1f} | {8 * m['host_startup']:.0f} |")
    return "\n".join(lines) + "\n\n(GB = 1e9 bytes.)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.memory_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["sd3.5-medium", "sd3.5-large"])
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--folder", default=None, help="count the components of this local diffusers folder instead")
    a = p.parse_args(argv)
    print(table(a.presets, a.ranks, a.stages, a.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
