"""FLOPs of diffusers' SD3Transformer2DModel, from its config: the numerator of MFU.

One multiply-add = 2 FLOPs. Per sample, with N image tokens (latent H·W / p²), M text tokens (CLIP +
T5 context), width D = heads · head_dim and the MLP's 4D hidden layer, one joint block costs

    image stream     2·N·(3D² + D² + 8D²)  = 24·N·D²     q,k,v + out + MLP
    text stream      2·M·12D² = 24·M·D²                  (last block: only q,k,v = 6·M·D²)
    joint attention  4·(N + M)²·D                         QKᵀ and AV over all N + M tokens
    dual attention   8·N·D² + 4·N²·D                      SD3.5-medium's extra image-only attention
    adaLN            2·D·(6D | 9D dual) + 2·D·(6D | 2D last)   from the pooled/time vector

plus the patch embedding 2·N·p²·C_in·D, the caption projection 2·M·d_text·D, the time and pooled
embedders, the final adaLN and the output projection 2·N·D·p²·C_out. A training step costs 3x the
forward (the backward pass is two matmuls per forward matmul); activation checkpointing recomputes
the forward but MFU, by convention (PaLM, nanoGPT), counts the model's FLOPs only, so it is not added.
Norms, activations, softmax and RoPE-free elementwise work are left out (< 1 % at SD3 sizes).
tests/test_bench.py checks this against torch.utils.flop_counter on real models.
"""

from __future__ import annotations

# Dense bf16 matrix peak of one accelerator, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {
    "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12, "GH200": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12,
}


def mmdit_forward_flops(config: dict, resolution_latent: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample: `config` is the transformer's config (dict or FrozenDict),
    `resolution_latent` the latent side (H = W), `text_tokens` the context length M."""
    c = config
    p, D = c["patch_size"], c["num_attention_heads"] * c["attention_head_dim"]
    N, M, L = (resolution_latent // p) ** 2, text_tokens, c["num_layers"]
    dual = set(c.get("dual_attention_layers") or ())
    flops = 2 * N * p * p * c["in_channels"] * D                           # patch embedding
    flops += 2 * M * c["joint_attention_dim"] * c["caption_projection_dim"]  # caption projection
    flops += 2 * (256 * D + D * D + c["pooled_projection_dim"] * D + D * D)  # time + pooled embedders
    for i in range(L):
        last = i == L - 1
        flops += 24 * N * D * D + (6 if last else 24) * M * D * D + 4 * (N + M) ** 2 * D
        flops += 2 * D * (9 if i in dual else 6) * D + 2 * D * (2 if last else 6) * D
        if i in dual:
            flops += 8 * N * D * D + 4 * N * N * D
    flops += 2 * D * 2 * D + 2 * N * D * p * p * c["out_channels"]           # final adaLN + output
    return float(flops)


def train_flops_per_sample(config: dict, resolution_latent: int, text_tokens: int) -> float:
    return 3.0 * mmdit_forward_flops(config, resolution_latent, text_tokens)


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name (None if unknown: pass --peak-tflops)."""
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.upper()
    if "H100" in name:
        return PEAK_BF16["H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    for key, value in PEAK_BF16.items():
        if key.split()[0] in name:
            return value
    return None
