"""tools/caption_effect.py: the probe's captions differ from the real one in exactly the swapped word (with the
right article), and its
effects are RMS changes of the one-step prediction (zero for the same caption, the closed form otherwise)."""

import pytest
import torch

from tools.caption_effect import effects, samples, table

OLD_RUN = __import__("conftest").REPO / "tests" / "assets" / "pre-layout-run"   # a tiny pixel-space checkpoint


def test_the_swapped_captions_change_exactly_one_word():
    images, captions, shape_swapped, colour_swapped = samples(6, 32)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    for cap, s, c in zip(captions, shape_swapped, colour_swapped):
        article, colour, shape = cap.removeprefix("a photo of ").split()
        _, colour_s, shape_s = s.removeprefix("a photo of ").split()
        article_c, colour_c, shape_c = c.removeprefix("a photo of ").split()
        assert (colour_s, shape_c) == (colour, shape) and shape_s != shape and colour_c != colour
        assert article == ("an" if colour == "orange" else "a") and article_c == ("an" if colour_c == "orange" else "a")


def test_effects_are_rms_changes_of_the_one_step_prediction():
    from t2i.checkpoint.loading import load
    from t2i.eval.sampling import guided_velocity

    loaded = load(OLD_RUN)
    images, captions, shape_swapped, _ = samples(4, loaded.cfg.data.resolution)
    rows = effects(loaded.model, loaded.text, images, {"caption": captions, "same": list(captions),
                                                       "shape": shape_swapped}, [0.5])
    assert rows[0]["same"] == 0.0 and rows[0]["shape"] > 0
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    x = 0.5 * images + 0.5 * noise
    t = torch.full((4,), 0.5)
    predict = lambda p: x - 0.5 * guided_velocity(loaded.model, loaded.text, p, 1.0, "cpu", torch.float32)(x, t)  # noqa: E731
    assert rows[0]["shape"] == pytest.approx(((predict(shape_swapped) - predict(captions)) ** 2).mean().sqrt().item(),
                                             rel=1e-5)
    assert rows[0]["error"] == pytest.approx(((predict(captions) - images) ** 2).mean().sqrt().item(), rel=1e-5)
    assert table([{**rows[0], "colour": 0.0, "dropped": 0.0}]).splitlines()[2].startswith("| 0.50 |")
