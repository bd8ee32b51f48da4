"""Per-rank memory of a training run, computed from parameter counts (no weights are read).

    python -m tools.memory_table                      # SD3.5-medium and -large, 8 and 16 ranks, ZeRO-2/3
    python -m tools.memory_table --lora-rank 16       # the same for a LoRA post-training (default targets)
    python -m tools.memory_table --ranks 8 16 32 --presets sd3.5-large
    python -m tools.memory_table --folder /weights/stable-diffusion-3.5-medium   # counts from your folder

Bytes per parameter (bf16 training with DeepSpeed 0.19.8, AdamW), N ranks:

    transformer buffers, B elements     the positional-embedding table (SD3.5-medium: 226M, large: 90M): fp32 on
                                        every rank. No ZeRO stage shards buffers, and DeepSpeed's bf16 cast
                                        (engine._cast_module_mixed_precision) casts parameters only: buffers keep
                                        the dtype they were built in unless `data_types.buffer_dtype` is set
    trainable transformer, P params     bf16 weights 2P, bf16 gradients 2P, fp32 master 4P, Adam m + v 8P
                                        ZeRO-1: master + Adam / N;  ZeRO-2: + gradients / N;
                                        ZeRO-3: + weights / N (a layer is gathered while it runs)
    t2i's EMA (fp32)                    4P / N: each rank holds the slice of the master it owns
    frozen encoders, bf16               CLIP-L 123.7M + OpenCLIP-bigG 694.7M + T5-XXL encoder 4.76B params, 2 bytes
                                        each, on every rank (encoders are not sharded)
    frozen VAE, fp32                    83.7M params (kept in fp32: SD3's VAE config sets force_upcast)

LoRA (`--lora-rank R`, lora.rank > 0; t2i/models/lora.py): the transformer's P parameters are a frozen base and
the A parameters of the adapters (rank x (in + out) per adapted Linear, `t2i.models.lora.parameter_count`; rank 16
with the default targets: sd3.5-medium 11,943,936, large 23,580,672) are the only trainable ones:

    frozen base, P params               bf16 weights 2P, no gradients, master, Adam or EMA.
                                        ZeRO-1/2: whole on every rank; ZeRO-3: 2P / N
    adapters, A params                  the trainable rules above with P -> A (gradients, master, Adam and t2i's
                                        EMA, which covers the adapters only), except the bf16 weights under
                                        ZeRO-3: 2A whole on every rank, since every adapter tensor is under
                                        DeepSpeed's stage3_param_persistence_threshold (1e5 elements; rank 16:
                                        at most 16 x 2432) and persistent parameters stay gathered
    buffers, encoders, VAE              as above

What DeepSpeed does with frozen parameters (read in deepspeed/runtime/engine.py, zero/stage_1_and_2.py,
zero/parameter_offload.py and zero/partition_parameters.py; checked on a 2-rank CPU run of the tiny model with
LoRA): the engine casts every parameter, frozen or not, to bf16 and moves the module to its device; ZeRO-1/2
flattens and partitions only the optimizer's parameter groups (t2i passes the adapters alone), so the frozen
base stays whole on every rank; ZeRO-3 converts every parameter of the module (`_convert_to_zero_parameters`
over `module.parameters()`, with no requires_grad filter) and so partitions the frozen base 1/N per rank too.
ZeRO-3 also keeps parameters of at most 1e5 elements gathered (persistent): in the frozen base those are the
biases and norms, 1.4M (medium) / 2.8M (large) elements, left out here (< 6 MB).

Activations are left out (they depend on batch, resolution and activation checkpointing; measure them
with `t2i bench`). Host RAM at start-up is what one rank holds while it loads on a GPU node: the
transformer in fp32 before DeepSpeed moves it to its device (the encoders are read straight to the
device in their target dtype, each once; the VAE is small). A LoRA run loads its base the same way (fp32 on the
host, hashed there, then the adapters are added in fp32 before DeepSpeed casts and moves the model): 4 (P + B + A).

`--folder` counts every component's parameters from a local diffusers folder's config files (built on
the meta device, no weights read) instead of the release numbers above. tests/test_memory_table.py
checks the start-up column against the peak RSS measured while a rank loads a release-shaped folder.
"""

from __future__ import annotations

import argparse

GB = 1e9
ENCODERS = {"clip_l": 123.65e6, "clip_g": 694.66e6, "t5_xxl_encoder": 4.762e9}
VAE = 83.65e6
BUFFER_BYTES = 4  # the transformer's buffers stay fp32 (DeepSpeed casts parameters only)


def _preset_model(preset: str):
    """A preset's SD3Transformer2DModel on the meta device (no memory), with SD3's VAE and text widths."""
    import torch

    from t2i.config import ModelConfig
    from t2i.models.mmdit import preset_kwargs

    from diffusers import SD3Transformer2DModel

    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128, joint_attention_dim=4096,
                           pooled_projection_dim=2048)
    with torch.device("meta"):
        return SD3Transformer2DModel(**kwargs)


def transformer_params(preset: str) -> tuple[int, int]:
    """Exact parameter and buffer counts of a preset, built on the meta device (no memory)."""
    model = _preset_model(preset)
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def adapter_params(preset: str, rank: int) -> int:
    """LoRA adapter parameters of a preset at `rank` with the default targets (0 for rank 0: full fine-tuning)."""
    if not rank:
        return 0
    from t2i.models.lora import parameter_count

    return parameter_count(preset, rank).parameters


def folder_params(folder: str, lora_rank: int = 0) -> dict[str, int]:
    """Parameter count of each component of a diffusers SD3/SD3.5 folder, from its config files alone, the
    transformer's buffer elements ("transformer_buffers") and its LoRA adapter parameters at `lora_rank` with the
    default targets ("adapters", 0 for rank 0)."""
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
            if lora_rank:
                from t2i.models.lora import adapter_size
                counts["adapters"] = adapter_size(module, lora_rank).parameters
            else:
                counts["adapters"] = 0
    return counts


def per_rank_gb(p: float, ranks: int, stage: int, encoders: float | None = None, vae: float = VAE,
                buffers: float = 0, adapters: float = 0) -> dict:
    """GB per rank for a P-parameter transformer with `buffers` buffer elements (fp32, not sharded by any ZeRO
    stage); `encoders` / `vae`: frozen parameter counts (release's by default), the encoders held in bf16
    and the VAE in fp32. `adapters` > 0: a LoRA run, the P parameters a frozen bf16 base and the `adapters`
    LoRA parameters the only trainable ones (the rules in the module docstring)."""
    encoders = sum(ENCODERS.values()) if encoders is None else encoders
    trained = adapters if adapters else p
    if adapters:  # frozen base: bf16 weights only, sharded by ZeRO-3 alone; the adapters stay gathered (persistent)
        weights = 2 * p / (ranks if stage == 3 else 1) + 2 * adapters
    else:
        weights = 2 * p / (ranks if stage == 3 else 1)
    weights += BUFFER_BYTES * buffers
    grads = 2 * trained / (ranks if stage >= 2 else 1)
    optimizer = 12 * trained / ranks
    ema = 4 * trained / ranks
    frozen = 2 * encoders + 4 * vae
    gpu = weights + grads + optimizer + ema + frozen
    # start-up peak of one rank on a GPU: the transformer (and adapters) in fp32 on the host; encoders go
    # straight to the device
    host = 4 * (p + adapters + buffers) + 4 * vae
    return {"weights": weights / GB, "grads": grads / GB, "optimizer": optimizer / GB, "ema": ema / GB,
            "frozen": frozen / GB, "gpu": gpu / GB, "host_startup": host / GB,
            "checkpoint_per_rank": (optimizer + ema + (2 * trained / ranks)) / GB}


def _gb(v: float) -> str:
    """One decimal, or three below 0.1 GB (a LoRA's optimizer columns) so that they do not print as 0.0."""
    return f"{v:.1f}" if v >= 0.1 or v == 0 else f"{v:.3f}"


def table(presets: list[str], ranks: list[int], stages: list[int], folder: str | None = None,
          lora_rank: int = 0) -> str:
    lines = ["| model | params | ranks | ZeRO | weights | grads | master+Adam | EMA | encoders+VAE | GPU per rank "
             "(no activations) | host RAM per rank at start-up | per node (8 ranks) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(preset, *transformer_params(preset), None, VAE, adapter_params(preset, lora_rank)) for preset in presets]
    if folder:
        counts = folder_params(folder, lora_rank)
        rows = [(folder, counts["transformer"], counts["transformer_buffers"],
                 sum(counts[f"text_encoder{s}"] for s in ("", "_2", "_3")), counts["vae"], counts["adapters"])]
    for name, p, buffers, encoders, vae, adapters in rows:
        label = f"{name} + LoRA r{lora_rank} ({adapters / 1e6:.1f}M trained)" if adapters else name
        for n in ranks:
            for stage in stages:
                m = per_rank_gb(p, n, stage, encoders, vae, buffers, adapters)
                lines.append(f"| {label} | {p / 1e9:.2f}B | {n} | {stage} | {_gb(m['weights'])} | {_gb(m['grads'])} | "
                             f"{_gb(m['optimizer'])} | {_gb(m['ema'])} | {_gb(m['frozen'])} | **{m['gpu']:.1f}** | "
                             f"{m['host_startup']:.1f} | {8 * m['host_startup']:.0f} |")
    return "\n".join(lines) + "\n\n(GB = 1e9 bytes.)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.memory_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["sd3.5-medium", "sd3.5-large"])
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--folder", default=None, help="count the components of this local diffusers folder instead")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="a LoRA post-training at rank R with the default targets (lora.rank; 0 = full fine-tuning)")
    a = p.parse_args(argv)
    if a.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {a.lora_rank}")
    print(table(a.presets, a.ranks, a.stages, a.folder, a.lora_rank))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
