"""Per-rank memory of a training run, computed from parameter counts (no weights are read).

    python -m tools.memory_table                      # SD3.5-medium and -large, 8 and 16 ranks, ZeRO-2/3
    python -m tools.memory_table --ranks 8 16 32 --presets sd3.5-large

Bytes per parameter (bf16 training with DeepSpeed, AdamW):

    trainable transformer, P params     bf16 weights 2P, bf16 gradients 2P, fp32 master 4P, Adam m + v 8P
                                        ZeRO-1: master + Adam / N;  ZeRO-2: + gradients / N;
                                        ZeRO-3: + weights / N (a layer is gathered while it runs)
    t2i's EMA (fp32)                    4P / N: each rank holds the slice of the master it owns
    frozen encoders, bf16               CLIP-L 123.7M + OpenCLIP-bigG 694.7M + T5-XXL encoder 4.76B params, 2 bytes
                                        each, on every rank (encoders are not sharded)
    frozen VAE, bf16                    83.7M params

Activations are left out (they depend on batch, resolution and activation checkpointing; measure them
with `t2i bench`). Host RAM at start-up is what one rank holds while it loads on a GPU node: the
transformer in fp32 before DeepSpeed moves it to its device (the encoders are read straight to the
device in their target dtype, each once; the VAE is small).
"""

from __future__ import annotations

import argparse

GB = 1e9
ENCODERS = {"clip_l": 123.65e6, "clip_g": 694.66e6, "t5_xxl_encoder": 4.762e9}
VAE = 83.65e6


def transformer_params(preset: str) -> int:
    """Exact parameter count of a preset, built on the meta device (no memory)."""
    import torch

    from t2i.config import ModelConfig
    from t2i.models.mmdit import preset_kwargs

    from diffusers import SD3Transformer2DModel

    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128, joint_attention_dim=4096,
                           pooled_projection_dim=2048)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    return sum(p.numel() for p in model.parameters())


def per_rank_gb(p: float, ranks: int, stage: int) -> dict:
    weights = 2 * p / (ranks if stage == 3 else 1)
    grads = 2 * p / (ranks if stage >= 2 else 1)
    optimizer = 12 * p / ranks
    ema = 4 * p / ranks
    frozen = 2 * (sum(ENCODERS.values()) + VAE)
    gpu = weights + grads + optimizer + ema + frozen
    host = 4 * p + 2 * VAE  # start-up peak of one rank on a GPU: encoders are read straight to the device
    return {"weights": weights / GB, "grads": grads / GB, "optimizer": optimizer / GB, "ema": ema / GB,
            "frozen": frozen / GB, "gpu": gpu / GB, "host_startup": host / GB,
            "checkpoint_per_rank": (optimizer + ema + (2 * p / ranks)) / GB}


def table(presets: list[str], ranks: list[int], stages: list[int]) -> str:
    lines = ["| model | params | ranks | ZeRO | weights | grads | master+Adam | EMA | encoders+VAE | GPU per rank "
             "(no activations) | host RAM per rank at start-up | per node (8 ranks) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset in presets:
        p = transformer_params(preset)
        for n in ranks:
            for stage in stages:
                m = per_rank_gb(p, n, stage)
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
    a = p.parse_args(argv)
    print(table(a.presets, a.ranks, a.stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
