"""Which scaled-dot-product-attention kernel runs the MMDiT's joint attention, and forcing one.

diffusers' SD3 attention processor calls `torch.nn.functional.scaled_dot_product_attention`, which picks a
kernel per call (flash, cuDNN, memory-efficient or the math fallback) from the shapes, dtype and device.
Which one it picks decides a large part of the attention time (the math kernel materialises the
(N+M)^2 score matrix) and is invisible in a profile summary, so t2i probes once at start-up:

    probe(heads=24, tokens=4429, head_dim=64, dtype=torch.bfloat16, device=cuda)
    -> {"auto": "flash", "usable": {"flash": True, "cudnn": True, "efficient": True, "math": True}, ...}

`model.attention_backend` forces one (`force_backend` wraps the model's forward in
`torch.nn.attention.sdpa_kernel`; activation checkpointing recomputes under the same context, see
t2i.models.mmdit). `auto` leaves the choice to torch.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i.errors import ConfigError

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
NAMES = {int(v): k for k, v in BACKENDS.items()}


def context(backend: str):
    """A context that restricts SDPA to `backend` ("auto": no restriction)."""
    return contextlib.nullcontext() if backend == "auto" else sdpa_kernel(BACKENDS[backend])


def context_fn(backend: str):
    """torch.utils.checkpoint's `context_fn` for `backend`: the recomputation in backward runs under the
    same kernel choice as the forward (checkpoint restores RNG and autocast state, not SDPA's flags)."""
    return lambda: (context(backend), context(backend))


def probe(heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device, batch: int = 1) -> dict:
    """One forward + backward attention call per backend at the model's shapes: which are usable, and which
    one torch picks on its own (`auto`; torch's own dispatcher, `torch._fused_sdp_choice`)."""
    shape = (batch, heads, tokens, head_dim)
    usable, reasons = {}, {}
    for name, backend in BACKENDS.items():
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
            usable[name] = True
        except RuntimeError as e:
            usable[name], reasons[name] = False, str(e).strip().splitlines()[0][:200]
    q = torch.randn(shape, device=device, dtype=dtype)
    try:
        auto = NAMES.get(int(torch._fused_sdp_choice(q, q, q)), "math")
    except (AttributeError, RuntimeError):  # a torch without the private dispatcher query
        auto = "unknown"
    return {"auto": auto, "usable": usable, "reasons": reasons,
            "shape": {"heads": heads, "tokens": tokens, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1]}}


def model_shape(config, latent_size: int, text_tokens: int) -> dict:
    """(heads, tokens, head_dim) of an SD3Transformer2DModel config's joint attention."""
    image_tokens = (latent_size // config["patch_size"]) ** 2
    return {"heads": config["num_attention_heads"], "tokens": image_tokens + text_tokens,
            "head_dim": config["attention_head_dim"]}


def resolve(requested: str, probed: dict) -> str:
    """The kernel that will run: `requested`, or torch's pick for auto. A forced kernel that cannot run at
    these shapes is refused (ConfigError naming the usable ones)."""
    if requested == "auto":
        return probed["auto"]
    if not probed["usable"].get(requested):
        usable = [k for k, ok in probed["usable"].items() if ok]
        raise ConfigError(f"model.attention_backend={requested} cannot run here ({probed['reasons'].get(requested)}); "
                          f"usable at these shapes: {', '.join(usable) or 'none'}, or 'auto'")
    return requested


def describe(probed: dict, chosen: str) -> str:
    s = probed["shape"]
    usable = ", ".join(k for k, ok in probed["usable"].items() if ok)
    return (f"attention: SDPA {chosen} ({s['heads']} heads x {s['tokens']} tokens x {s['head_dim']}, {s['dtype']}; "
            f"usable: {usable}; torch's own pick: {probed['auto']})")


def force_backend(model: torch.nn.Module, backend: str) -> None:
    """Run every forward of `model` under `sdpa_kernel(backend)` (no-op for auto). The module tree and
    state dict are unchanged; only the instance's forward is wrapped."""
    if backend == "auto":
        return
    forward = model.forward

    @functools.wraps(forward)
    def forward_with_backend(*args, **kwargs):
        with context(backend):
            return forward(*args, **kwargs)

    model.forward = forward_with_backend
