"""GenEval detector / colour classifier backends on tiny random models saved to local folders.

The Mask2Former checks recompute mmdet's instance_postprocess independently from the raw model
outputs; the colour checks recompute CLIP_benchmark's zero-shot classifier by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_clipscore import tiny_clip_checkpoint
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

from t2i.geneval_spec import GENEVAL_COLORS
from t2i.eval.detectors import (
    COLOR_TEMPLATES,
    MMDET_MEAN,
    MMDET_STD,
    ClipColorClassifier,
    Mask2FormerDetector,
    geneval_crop,
    rescale_size,
)
from t2i.eval.geneval import Detection

CLASSES = ["person", "bicycle", "car", "motorcycle", "airplane"]
SCALE = (96, 64)                    # long side <= 96, short side 64 (mmdet default: (1333, 800))


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory):
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, num_queries=10, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, id2label=dict(enumerate(CLASSES)))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("m2f") / "tiny-m2f"
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    return folder


def rgb_noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return (0.0,) * 4 if len(xs) == 0 else (float(xs.min()), float(ys.min()), xs.max() + 1.0, ys.max() + 1.0)


def test_mmdet_resize_rule():
    assert rescale_size(512, 512) == (800, 800)
    assert rescale_size(1024, 512) == (1333, 667)            # long side caps: f = 1333 / 1024
    assert rescale_size(640, 480) == (1067, 800)
    assert rescale_size(70, 45, SCALE) == (96, 62)


def test_preprocess_normalises_and_pads_to_32(m2f_dir):
    det = Mask2FormerDetector(m2f_dir, scale=SCALE)
    image = Image.new("RGB", (70, 45), (200, 100, 50))
    pixel_values, pixel_mask, valid = det.preprocess([image])
    assert valid == [(62, 96)] and pixel_values.shape == (1, 3, 64, 96)
    expected = (torch.tensor([200.0, 100.0, 50.0]) - torch.tensor(MMDET_MEAN)) / torch.tensor(MMDET_STD)
    torch.testing.assert_close(pixel_values[0, :, :62, :].mean((1, 2)), expected)
    assert pixel_values[0, :, 62:].abs().max() == 0 and pixel_mask[0, :62].all() and not pixel_mask[0, 62:].any()


def test_mask2former_detections_follow_mmdet_instance_postprocess(m2f_dir):
    det = Mask2FormerDetector(m2f_dir, scale=SCALE)
    assert det.class_names == CLASSES and det.name == "mask2former(tiny-m2f)"
    image = rgb_noise(70, 45, seed=0)                          # non-square, not a multiple of 32
    (dets,) = det([image])
    assert len(dets) == min(100, 10 * len(CLASSES))           # top-k over queries x classes
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for d in dets:
        assert isinstance(d, Detection) and 0 <= d.label < len(CLASSES) and 0 <= d.score <= 1
        assert d.mask.dtype == bool and d.mask.shape == (45, 70)
        assert d.box == tight_box(d.mask)

    # independent recomputation from the raw outputs on the same input
    pixel_values, pixel_mask, _ = det.preprocess([image])
    with torch.no_grad():
        out = det.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    probs = out.class_queries_logits[0].softmax(-1)[:, :-1].numpy()           # [10, 5]
    expected = []
    for q in range(probs.shape[0]):
        m = F.interpolate(out.masks_queries_logits[0, q][None, None], size=(64, 96), mode="bilinear")[..., :62, :96]
        m = F.interpolate(m, size=(45, 70), mode="bilinear")[0, 0].numpy()
        binary = m > 0
        mask_score = (1 / (1 + np.exp(-m)))[binary].sum() / (binary.sum() + 1e-6)
        expected += [(probs[q, c] * mask_score, c, tight_box(binary)) for c in range(probs.shape[1])]
    expected.sort(key=lambda e: -e[0])
    np.testing.assert_allclose([d.score for d in dets], [e[0] for e in expected], rtol=1e-4, atol=1e-6)
    assert sorted((d.label, d.box) for d in dets) == sorted((e[1], e[2]) for e in expected)


def test_postprocess_on_hand_built_logits(m2f_dir):
    """Masks at 1/4 of the padded 64x96 input; valid (= original) area 56x96. A ±100 step in the
    low-res logits crosses 0 exactly at 4x the low-res edge, so boxes are hand-computable."""
    det = Mask2FormerDetector(m2f_dir, scale=SCALE)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])   # last column: no object
    masks = torch.full((3, 16, 24), -100.0)
    masks[0, 2:5, 3:6] = 100.0                     # rows 8..19, cols 12..23
    masks[0, 12:16, 20:24] = 100.0                 # reaches into the padding: cropped at row 56
    masks[1] = -3.0                                # empty mask: zero box, zero score
    masks[2] = 2.0                                 # everything: mask score = sigmoid(2)
    dets = det.postprocess(probs.log(), masks, (64, 96), (56, 96), (56, 96))
    got = {(d.label, d.box): d.score for d in dets}
    s2 = torch.sigmoid(torch.tensor(2.0)).item()
    expected = {(0, (12.0, 8.0, 96.0, 56.0)): 0.5, (1, (12.0, 8.0, 96.0, 56.0)): 0.3,
                (0, (0.0, 0.0, 0.0, 0.0)): 0.0, (1, (0.0, 0.0, 0.0, 0.0)): 0.0,
                (0, (0.0, 0.0, 96.0, 56.0)): 0.25 * s2, (1, (0.0, 0.0, 96.0, 56.0)): 0.25 * s2}
    assert got.keys() == expected.keys() and len(dets) == 6
    for key, score in expected.items():           # near the block edges sigmoid(logit) < 1 slightly
        assert got[key] == pytest.approx(score, abs=1e-5)
    block = next(d for d in dets if d.box[0] == 12.0).mask
    assert block.shape == (56, 96) and block.sum() == 12 * 12 + 8 * 16 - 5   # bilinear cuts 5 corner pixels


def test_mask2former_top_k_and_batching_are_per_image(m2f_dir):
    det = Mask2FormerDetector(m2f_dir, scale=SCALE, max_per_image=7, batch_size=4)
    images = [rgb_noise(70, 45, 1), rgb_noise(50, 50, 2), rgb_noise(70, 45, 3)]
    batched = det(images)
    assert [len(d) for d in batched] == [7, 7, 7]
    for image, dets in zip(images, batched):                  # mixed sizes: padded as if alone
        alone = det([image])[0]
        np.testing.assert_allclose([d.score for d in dets], [d.score for d in alone], rtol=1e-5, atol=1e-7)
        assert [d.box for d in dets] == [d.box for d in alone]


def test_mask2former_rejects_bad_folders_and_class_lists(m2f_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local Mask2Former folder"):
        Mask2FormerDetector(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(ValueError, match="expected 'mask2former'"):
        Mask2FormerDetector(tmp_path)
    with pytest.raises(ValueError, match="3 class names for a model with 5 classes"):
        Mask2FormerDetector(m2f_dir, class_names=["a", "b", "c"])
    assert Mask2FormerDetector(m2f_dir, class_names=list("abcde")).class_names == list("abcde")


def test_geneval_crop_greys_out_the_background_and_crops_to_the_box():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:9] = True
    crop = np.array(geneval_crop(image, Detection(0, 0.9, (3.0, 1.0, 11.0, 7.0), mask)))
    assert crop.shape == (6, 8, 3)
    inside = mask[1:7, 3:11]
    assert (crop[inside] == (255, 0, 0)).all() and (crop[~inside] == (153, 153, 153)).all()
    assert np.array(geneval_crop(image, Detection(0, 0.9, (3.0, 1.0, 11.0, 7.0)))).shape == (6, 8, 3)
    with pytest.raises(ValueError, match="does not match"):
        geneval_crop(image, Detection(0, 0.9, (0, 0, 1, 1), np.zeros((20, 10), bool)))


@pytest.fixture(scope="module")
def color_clf(tmp_path_factory):
    return ClipColorClassifier(*tiny_clip_checkpoint(tmp_path_factory.mktemp("clip")), batch_size=2)


def test_color_classifier_matrix_is_clip_benchmark_zero_shot(color_clf):
    W = color_clf.classifier("car")
    assert W.shape == (16, len(GENEVAL_COLORS)) and color_clf.colors == GENEVAL_COLORS
    torch.testing.assert_close(W.norm(dim=0), torch.ones(len(GENEVAL_COLORS)))
    texts = ["a photo of a blue car", "a photo of a blue-colored car", "a photo of a blue object"]
    assert [t.format(color="blue", cls="car") for t in COLOR_TEMPLATES] == texts
    with torch.no_grad():
        emb = color_clf.model.encode_text(color_clf.tokenizer(texts))
    column = F.normalize(emb, dim=-1).mean(0)
    torch.testing.assert_close(W[:, GENEVAL_COLORS.index("blue")], column / column.norm())
    assert color_clf.classifier("car") is W and not torch.equal(color_clf.classifier("dog"), W)


def test_color_predictions_are_argmax_over_masked_crops(color_clf):
    image = rgb_noise(48, 40, seed=5)
    masks = [np.zeros((40, 48), bool) for _ in range(3)]
    masks[0][5:20, 5:30] = True
    masks[1][10:40, 20:48] = True
    objects = [Detection(2, 0.9, (5.0, 5.0, 30.0, 20.0), masks[0]),     # 3 crops in batches of 2,
               Detection(2, 0.8, (20.0, 10.0, 48.0, 40.0), masks[1]),   # the last one without a mask
               Detection(2, 0.7, (0.0, 0.0, 16.0, 16.0))]

    seen = []
    preprocess = color_clf.preprocess
    color_clf.preprocess = lambda im: seen.append(im) or preprocess(im)
    try:
        predicted = color_clf(image, objects, "car")
    finally:
        color_clf.preprocess = preprocess
    assert [im.size for im in seen] == [(25, 15), (28, 30), (16, 16)]
    assert (np.array(seen[0])[~masks[0][5:20, 5:30]] == 153).all()

    with torch.no_grad():
        x = torch.stack([preprocess(geneval_crop(image, o)) for o in objects])
        logits = 100 * F.normalize(color_clf.model.encode_image(x), dim=-1) @ color_clf.classifier("car")
    assert predicted == [GENEVAL_COLORS[k] for k in logits.argmax(1).tolist()]
    torch.testing.assert_close(color_clf.logits(image, objects, "car"), logits)
    assert color_clf(image, [], "car") == []
