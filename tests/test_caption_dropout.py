"""Caption dropout: the joint drop and the per-encoder drops happen at the rates the formula states,
the joint drop gives exactly CFG's unconditional input, and the draws do not depend on the rates."""

import math

import pytest
import torch

from t2i.caption_dropout import ENCODERS, draw_masks, drop_rate, unconditional_fraction
from t2i.config import TextEncoderConfig
from t2i.models.text_encoders import TextEncoders

DRAWS = 200_000
CAPTIONS = ["a photo of a red circle", "a photo of two green squares", "a photo of a blue triangle"]


def within_5_sigma(hits: torch.Tensor, p: float) -> bool:
    """|empirical rate − p| ≤ 5 binomial standard deviations (and exact when p is 0 or 1)."""
    rate = hits.double().mean().item()
    return abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / hits.numel())


def test_the_formula_by_hand():
    assert unconditional_fraction(0.1, (0.1, 0.1, 0.1)) == pytest.approx(0.1 + 0.9 * 0.001)
    assert unconditional_fraction(0.0, (0.464,) * 3) == pytest.approx(0.099897344)
    assert unconditional_fraction(0.0, (0.1,) * 3) == pytest.approx(0.001)   # the old shipped setting
    assert drop_rate(0.1, 0.1) == pytest.approx(0.19) and drop_rate(1.0, 0.0) == 1.0


@pytest.mark.parametrize("p_all,p_enc", [(0.1, (0.1, 0.1, 0.1)), (0.0, (0.464, 0.464, 0.464)),
                                         (0.3, (0.5, 0.2, 0.05)), (0.0, (0.1, 0.1, 0.1))])
def test_200k_draws_match_the_unconditional_fraction_and_every_marginal(p_all, p_enc):
    drop = draw_masks(DRAWS, p_all, p_enc, torch.Generator().manual_seed(0))
    assert drop.shape == (DRAWS, len(ENCODERS)) and drop.dtype == torch.bool
    assert within_5_sigma(drop.all(1), unconditional_fraction(p_all, p_enc))
    for k, p in enumerate(p_enc):
        assert within_5_sigma(drop[:, k], drop_rate(p_all, p))
    # the joint drop correlates the encoders: P(L and G) = p_all + (1 − p_all)·p_L·p_G, not the product
    assert within_5_sigma(drop[:, 0] & drop[:, 1], p_all + (1 - p_all) * p_enc[0] * p_enc[1])


def test_probabilities_zero_and_one_are_exact():
    g = torch.Generator().manual_seed(1)
    assert not draw_masks(1000, 0.0, (0.0, 0.0, 0.0), g).any()
    assert draw_masks(1000, 1.0, (0.0, 0.0, 0.0), g).all()
    assert draw_masks(1000, 0.0, (1.0, 1.0, 1.0), g).all()


def test_the_stream_position_depends_on_the_batch_size_only():
    after = []
    for p_all, p_enc in [(0.0, (0.0, 0.0, 0.0)), (0.1, (0.1, 0.1, 0.1)), (1.0, (0.5, 0.2, 1.0))]:
        g = torch.Generator().manual_seed(3)
        draw_masks(7, p_all, p_enc, g)
        after.append(torch.rand(4, generator=g))
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])


def test_the_training_path_replaces_exactly_the_drawn_parts_and_a_joint_drop_is_the_empty_encoding():
    te = TextEncoders(TextEncoderConfig(dropout_all=0.3, dropout_clip_l=0.2, dropout_clip_g=0.2, dropout_t5=0.2))
    ctx, pooled = te.encode(CAPTIONS)
    ctx, pooled = ctx.repeat(200, 1, 1), pooled.repeat(200, 1)          # 600 cached encodings (data.cache path)
    d_ctx, d_pooled = te.apply_caption_dropout(ctx, pooled, torch.Generator().manual_seed(5))
    drop = draw_masks(len(ctx), 0.3, (0.2, 0.2, 0.2), torch.Generator().manual_seed(5))
    e_ctx, e_pooled = te.encode_empty(1)
    for k, (rows, cols, pcols) in enumerate(te._parts()):
        empty = (d_ctx[:, rows, cols] == e_ctx[:, rows, cols]).flatten(1).all(1)
        kept = (d_ctx[:, rows, cols] == ctx[:, rows, cols]).flatten(1).all(1)
        assert torch.equal(empty, drop[:, k]) and torch.equal(kept, ~drop[:, k])
        if pcols is not None:
            assert torch.equal((d_pooled[:, pcols] == e_pooled[:, pcols]).all(1), drop[:, k])
    none = drop.all(1)
    assert 0 < none.sum() < len(ctx)
    assert torch.equal(d_ctx[none], e_ctx.expand(int(none.sum()), -1, -1))      # exactly CFG's uncond input
    assert torch.equal(d_pooled[none], e_pooled.expand(int(none.sum()), -1))
    # live encoders: encode(dropout=True) is encode() followed by the same draws
    a = te.encode(CAPTIONS, generator=torch.Generator().manual_seed(9), dropout=True)
    b = te.apply_caption_dropout(*te.encode(CAPTIONS), torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dropout_all_outside_the_unit_interval_is_refused_by_name():
    with pytest.raises(ValueError, match="dropout_all"):
        TextEncoders(TextEncoderConfig(dropout_all=1.5))
