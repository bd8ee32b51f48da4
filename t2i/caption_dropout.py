"""Caption dropout: which training samples lose which text encoders (docs/design/flow.md §5.1).

Classifier-free guidance samples with v_u + s·(v_c − v_u), where v_u is the model's velocity with
*every* encoder's slice set to its encoding of "". The model only learns that input from samples
whose text was dropped entirely. Drawing each encoder's drop independently at p makes that input
rare: at SD3's p = 0.464, 0.464³ ≈ 10 % of samples have no text; at p = 0.1 only 0.1 % do. So there
are two mechanisms, and a sample's drops are decided like this:

    with probability p_all              every encoder is dropped together (the joint drop);
    otherwise, independently per encoder  encoder e is dropped with probability p_e.

The implied rates are pure functions of the probabilities (`unconditional_fraction`, `drop_rate`),
so a test can check every shipped config without drawing anything, and `draw_masks` is the one
function the training step uses to decide the drops (live encoders and the `data.cache` path alike).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

ENCODERS = ("clip_l", "clip_g", "t5")  # the column order of every mask; `text.dropout_<name>` in the config
UNIFORMS_PER_SAMPLE = 1 + len(ENCODERS)  # joint, then one per encoder: drawn whatever the probabilities


def unconditional_fraction(p_all: float, p_encoders: Sequence[float]) -> float:
    """P(a sample has all text dropped) = p_all + (1 − p_all)·Π_e p_e."""
    return p_all + (1 - p_all) * math.prod(p_encoders)


def drop_rate(p_all: float, p_encoder: float) -> float:
    """P(one encoder's slice is dropped) = p_all + (1 − p_all)·p_e (the marginal of one mask column)."""
    return p_all + (1 - p_all) * p_encoder


def config_probabilities(text_cfg) -> tuple[float, tuple[float, ...]]:
    """(p_all, (p_clip_l, p_clip_g, p_t5)) of a TextEncoderConfig."""
    return text_cfg.dropout_all, tuple(getattr(text_cfg, f"dropout_{e}") for e in ENCODERS)


def draw_masks(n: int, p_all: float, p_encoders: Sequence[float],
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool [n, 3]: True where sample i drops encoder e (columns in ENCODERS order), on the CPU.

    Always draws n × 4 float64 uniforms from `generator` (column 0 decides the joint drop, columns
    1–3 the per-encoder drops), so the generator's position afterwards depends on n only: a resumed
    run (the generator state is checkpointed) draws the same noise and σ's next whatever the
    probabilities are, and changing a probability changes no other draw.
    """
    if len(p_encoders) != len(ENCODERS):
        raise ValueError(f"need one dropout probability per encoder {ENCODERS}, got {list(p_encoders)}")
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(n, UNIFORMS_PER_SAMPLE, generator=generator, dtype=torch.float64, device=device).cpu()
    joint = u[:, 0] < p_all
    own = u[:, 1:] < torch.tensor([float(p) for p in p_encoders], dtype=torch.float64)
    return own | joint[:, None]
