"""McNemar, Wilson and Holm against hand-computed values and independent formulas."""

import math

import numpy as np
import pytest

from t2i.eval.stats import holm, mcnemar, wilson


def test_mcnemar_counts_only_discordant_pairs_and_matches_the_binomial_sum():
    a = np.array([1] * 50 + [1] * 3 + [0] * 12 + [0] * 35, dtype=bool)
    b = np.array([1] * 50 + [0] * 3 + [1] * 12 + [0] * 35, dtype=bool)
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (3, 12, 100)
    assert r["diff"] == pytest.approx(0.09)
    # two-sided exact: 2 * P(X <= 3), X ~ Bin(15, 1/2)
    p = 2 * sum(math.comb(15, k) for k in range(4)) / 2**15
    assert r["p"] == pytest.approx(p, rel=1e-12)
    assert mcnemar(b, a)["p"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_without_discordant_pairs_is_p_one_and_shapes_must_match():
    x = np.array([True, False, True])
    assert mcnemar(x, x)["p"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        mcnemar(x, x[:2])


def test_wilson_interval_matches_the_closed_form():
    lo, hi = wilson(14, 100)
    # Wilson (1927): (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    z, n, p = 1.959964, 100, 0.14
    c, h = (p + z * z / 200) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / 40000) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    assert 0.08 < lo < 0.14 < hi < 0.23
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_holm_adjusts_in_rank_order_and_keeps_monotonicity():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 caps at 1, and the larger p cannot drop below it
    assert holm([0.2, 0.01, 0.04]) == pytest.approx([0.2, 0.03, 0.08])


def test_off_palette_fraction_counts_pixels_far_from_every_palette_colour():
    from t2i.data.shapes import BACKGROUND, COLORS
    from t2i.eval.shapes_detector import off_palette_fraction

    img = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[0, 0, :2] = list(COLORS.values())[0]            # on the palette
    img[0, 1, :3] = np.array(BACKGROUND) - 20           # within 48 of the background (20·√3 ≈ 35)
    img[1, 2:, :] = (90, 200, 200)                      # 127 from the nearest colour: 8 of 16 pixels
    img[1, 0, 0] = np.array(BACKGROUND) - 30            # 30·√3 ≈ 52 > 48
    out = off_palette_fraction(img)
    assert out.shape == (2,) and out[0] == 0.0 and out[1] == pytest.approx(9 / 16)
    assert off_palette_fraction(img[1], max_color_dist=60.0) == pytest.approx(8 / 16)
    assert off_palette_fraction(img[1], max_color_dist=130.0) == 0.0


def test_eval_pairs_images_by_prompt_folder_and_sample(tmp_path):
    """t2i eval's paired comparison matches images across checkpoints by <prompt>/samples/<k>.png."""
    import json

    from pipelines.evaluate import paired_geneval, paired_markdown

    outcomes = {"a": [1, 1, 0, 0, 1, 0], "b": [1, 0, 1, 1, 1, 1]}
    folders = {}
    for label, correct in outcomes.items():
        folders[label] = tmp_path / label
        (folders[label] / "geneval").mkdir(parents=True)
        rows = [{"filename": str(folders[label] / f"{i // 2:05d}" / "samples" / f"{i % 2:04d}.png"), "correct": c,
                 "tag": "single_object"} for i, c in enumerate(correct)]
        (folders[label] / "geneval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    paired = paired_geneval(folders)
    assert paired["accuracy"]["a"]["correct"] == 3 and paired["accuracy"]["b"]["images"] == 6
    (pair,) = paired["pairs"]
    assert (pair["a"], pair["b"], pair["a_only"], pair["b_only"]) == ("a", "b", 1, 3)
    assert pair["p"] == pytest.approx(2 * (1 + 4) / 16)  # 2·P(X ≤ 1), X ~ Bin(4, 1/2)
    text = "\n".join(paired_markdown(paired))
    assert "| a vs b | 1 | 3 | +0.333 | 0.625 |" in text
