"""t2i.data.shapes: determinism, ground truth that matches the pixels, GenEval-parsable captions.

The GenEval position rule and the caption parser are written here from docs/design/evaluation.md §1.1/§1.5,
independently of the generator, so a generator bug cannot hide behind shared code.
"""
import itertools
import re

import numpy as np
import pytest
from scipy import ndimage

from t2i.data.shapes import BACKGROUND, COLORS, SHAPES, TAGS, iter_samples, make_sample

N = 240  # 40 of each tag
SAMPLES = [make_sample(i) for i in range(N)]
WORD_COUNTS = {"two": 2, "three": 3, "four": 4}


def pixels(image):
    return np.asarray(image, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def geneval_relations(box_a, box_b, threshold=0.1):
    """Relations of A to B exactly as GenEval's evaluate_images.relative_position computes them."""
    ca = [(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2]
    cb = [(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2]
    da = [abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1])]
    db = [abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1])]
    offset = [ca[i] - cb[i] for i in range(2)]
    revised = [np.sign(offset[i]) * max(abs(offset[i]) - threshold * (da[i] + db[i]), 0) for i in range(2)]
    if abs(revised[0]) < 1e-3 and abs(revised[1]) < 1e-3:
        return set()
    norm = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


COLOR = "|".join(COLORS)
SHAPE = "|".join(SHAPES)
NP = rf"an? (?:(?P<c{{i}}>{COLOR}) )?(?P<s{{i}}>{SHAPE})"
PATTERNS = {
    "one": re.compile(rf"a photo of {NP.format(i=1)}$"),
    "two": re.compile(rf"a photo of {NP.format(i=1)} and {NP.format(i=2)}$"),
    "counting": re.compile(rf"a photo of (?P<n>two|three|four) (?P<c1>{COLOR}) (?P<s1>{SHAPE})s$"),
    "position": re.compile(rf"a photo of {NP.format(i=1)} (?P<rel>left of|right of|above|below) {NP.format(i=2)}$"),
}


def parse_caption(caption):
    """Caption -> (objects as (shape, colour or None) in caption order, count, relation)."""
    for kind, pattern in PATTERNS.items():
        m = pattern.match(caption)
        if m:
            g = m.groupdict()
            objs = [(g["s1"], g["c1"])] + ([(g["s2"], g["c2"])] if "s2" in g else [])
            n = WORD_COUNTS[g["n"]] if kind == "counting" else 1
            return objs, n, g.get("rel")
    raise AssertionError(f"caption does not parse: {caption!r}")


# ---------------------------------------------------------------------------------------------
# Determinism and proportions
# ---------------------------------------------------------------------------------------------


def test_same_index_gives_identical_sample_regardless_of_call_order():
    later = [make_sample(i) for i in (37, 5, 200)]
    for (img, cap, meta), i in zip(later, (37, 5, 200)):
        img0, cap0, meta0 = SAMPLES[i]
        assert np.array_equal(pixels(img), pixels(img0)) and cap == cap0 and meta == meta0
    keys = [(k, c) for k, _, c, _ in iter_samples(12)]
    assert keys == [(f"{i:08d}", SAMPLES[i][1]) for i in range(12)]


def test_different_seeds_give_different_images():
    for i in range(12):
        assert not np.array_equal(pixels(make_sample(i, seed=0)[0]), pixels(make_sample(i, seed=1)[0]))


def test_all_six_geneval_tags_have_equal_shares_over_600_samples():
    tags = [make_sample(i)[2]["tag"] for i in range(600)]
    assert set(TAGS) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert {t: tags.count(t) for t in TAGS} == {t: 100 for t in TAGS}


def test_within_tag_choices_cover_every_class_colour_count_and_relation():
    metas = [m for _, _, m in SAMPLES]
    assert {o["shape"] for m in metas for o in m["objects"]} == set(SHAPES)
    assert {o["color"] for m in metas for o in m["objects"]} == set(COLORS)
    assert {len(m["objects"]) for m in metas if m["tag"] == "counting"} == {2, 3, 4}
    assert {m["include"][1]["position"][0] for m in metas if m["tag"] == "position"} == {
        "left of", "right of", "above", "below"}


def test_rejects_sizes_too_small_to_recognise():
    with pytest.raises(ValueError, match="size"):
        make_sample(0, size=16)


# ---------------------------------------------------------------------------------------------
# Ground truth == pixels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 32, 128])
def test_every_pixel_is_background_or_exactly_its_objects_colour(size):
    samples = SAMPLES if size == 64 else [make_sample(i, size=size) for i in range(60)]
    palette = {tuple(v) for v in COLORS.values()}
    assert len(palette) == 6 and tuple(BACKGROUND) not in palette
    for img, _, meta in samples:
        px = pixels(img)
        assert img.mode == "RGB" and img.size == (size, size) == (meta["width"], meta["height"])
        assert meta["background"] == list(BACKGROUND)
        colours = {tuple(c) for c in px.reshape(-1, 3)}
        assert colours <= palette | {tuple(BACKGROUND)}, "anti-aliased or off-palette pixels"
        covered = np.zeros(px.shape[:2], dtype=bool)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert obj["rgb"] == list(COLORS[obj["color"]])
            crop = px[y0:y1, x0:x1]
            fg = (crop != BACKGROUND).any(-1)
            assert (crop[fg] == obj["rgb"]).all()
            # the box is tight: every edge row/column of the box holds object pixels
            assert fg[0].any() and fg[-1].any() and fg[:, 0].any() and fg[:, -1].any()
            covered[y0:y1, x0:x1] |= fg
        assert not ((px != BACKGROUND).any(-1) & ~covered).any(), "foreground outside every box"


def test_connected_regions_equal_objects_and_each_is_one_colour():
    for img, _, meta in SAMPLES:
        px = pixels(img)
        labels, n = ndimage.label((px != BACKGROUND).any(-1), structure=np.ones((3, 3)))  # 8-connectivity
        assert n == len(meta["objects"])
        regions = {}
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            assert len({tuple(c) for c in px[ys, xs]}) == 1
            regions[(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)] = tuple(px[ys[0], xs[0]])
        assert regions == {tuple(o["box"]): tuple(o["rgb"]) for o in meta["objects"]}


def test_shape_class_is_readable_from_the_pixels_by_fill_ratio():
    # square fills its box, circle ~pi/4, triangle ~1/2
    expected = {"square": (1.0, 1.0), "circle": (0.72, 0.84), "triangle": (0.40, 0.60)}
    for img, _, meta in SAMPLES:
        px = pixels(img)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            fill = (px[y0:y1, x0:x1] != BACKGROUND).any(-1).mean()
            lo, hi = expected[obj["shape"]]
            assert lo <= fill <= hi, (obj, fill)


def test_shapes_are_22_to_34_percent_of_the_side_and_separated_by_a_gap():
    for img, _, meta in SAMPLES:
        boxes = [o["box"] for o in meta["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0.2 * 64 <= max(x1 - x0, y1 - y0) <= 0.34 * 64
        for a, b in itertools.combinations(boxes, 2):
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])  # >0: pixels between them
            assert gap >= 3, (a, b)


# ---------------------------------------------------------------------------------------------
# Captions and GenEval clauses
# ---------------------------------------------------------------------------------------------


def test_captions_parse_back_to_the_ground_truth():
    for _, caption, meta in SAMPLES:
        assert meta["caption"] == caption
        objs, n, rel = parse_caption(caption)
        tag, truth = meta["tag"], meta["objects"]
        if tag == "counting":
            assert len(truth) == n and all((o["shape"], o["color"]) == objs[0] for o in truth)
        else:
            names_colour = tag in ("colors", "color_attr", "position")
            assert objs == [(o["shape"], o["color"] if names_colour else None) for o in truth]
        assert len(objs) == {"single_object": 1, "colors": 1, "counting": 1}.get(tag, 2)
        assert (rel is not None) == (tag == "position")
        if len(truth) == 2 and tag != "counting":
            assert truth[0]["shape"] != truth[1]["shape"]
        if tag == "color_attr":
            assert truth[0]["color"] != truth[1]["color"]


def test_articles_follow_geneval():
    captions = [c for _, c, _ in SAMPLES]
    assert any("an orange" in c for c in captions)
    assert not any(re.search(r"\ba orange\b|\ban (?!orange)", c) for c in captions)


def test_include_and_exclude_clauses_have_geneval_structure():
    for _, caption, meta in SAMPLES:
        tag, objs, inc, exc = meta["tag"], meta["objects"], meta["include"], meta["exclude"]
        one = lambda o, colour: {"class": o["shape"], "count": 1, **({"color": o["color"]} if colour else {})}
        if tag == "single_object":
            assert inc == [one(objs[0], False)] and exc == []
        elif tag == "colors":
            assert inc == [one(objs[0], True)] and exc == []
        elif tag == "two_object":
            assert inc == [one(objs[0], False), one(objs[1], False)] and exc == []
        elif tag == "color_attr":
            assert inc == [one(objs[0], True), one(objs[1], True)] and exc == []
        elif tag == "counting":
            n = len(objs)
            assert inc == [{"class": objs[0]["shape"], "count": n, "color": objs[0]["color"]}]
            assert exc == [{"class": objs[0]["shape"], "count": n + 1}]
        elif tag == "position":  # "A rel B": include = [B, A with position [rel, 0]]
            rel = parse_caption(caption)[2]
            assert inc == [one(objs[1], True), {**one(objs[0], True), "position": [rel, 0]}] and exc == []


def test_position_pairs_satisfy_geneval_rule_unambiguously_with_margin():
    rng = np.random.default_rng(0)
    positions = [(c, m) for _, c, m in SAMPLES if m["tag"] == "position"]
    assert len(positions) == N // 6
    for caption, meta in positions:
        rel = parse_caption(caption)[2]
        a_box, b_box = meta["objects"][0]["box"], meta["objects"][1]["box"]
        assert geneval_relations(a_box, b_box) == {rel}
        # a detector's box may be off by a couple of pixels: the verdict must not change
        for _ in range(20):
            ja = np.asarray(a_box) + rng.integers(-2, 3, size=4)
            jb = np.asarray(b_box) + rng.integers(-2, 3, size=4)
            assert geneval_relations(ja, jb) == {rel}
        # and it holds from the evaluator's side: the include clause points at B
        target, subject = meta["include"]
        assert subject["position"] == [rel, 0] and target["class"] == meta["objects"][1]["shape"]


def test_geneval_rule_reference_matches_hand_examples():
    # guard the test's own reference: clear left, diagonal (both), and too close to call
    assert geneval_relations([0, 0, 10, 10], [30, 0, 40, 10]) == {"left of"}
    assert geneval_relations([0, 40, 10, 50], [0, 0, 10, 10]) == {"below"}
    assert geneval_relations([0, 0, 10, 10], [30, 30, 40, 40]) == {"left of", "above"}
    assert geneval_relations([0, 0, 10, 10], [1, 0, 11, 10]) == set()


# ---------------------------------------------------------------------------------------------
# Other aspect ratios: the square rendering centred on background
# ---------------------------------------------------------------------------------------------


def test_make_sample_sized_is_make_sample_for_a_square_size():
    from t2i.data.shapes import make_sample_sized

    for i in range(6):
        image, caption, meta = make_sample_sized(i, 2, 48, 48)
        ref_image, ref_caption, ref_meta = make_sample(i, 2, 48)
        assert np.array_equal(pixels(image), pixels(ref_image)) and (caption, meta) == (ref_caption, ref_meta)


@pytest.mark.parametrize("width,height", [(96, 64), (64, 96), (33, 80)])
def test_make_sample_sized_pads_the_short_side_square_with_background_and_shifts_the_boxes(width, height):
    from t2i.data.shapes import make_sample_sized

    side = min(width, height)
    dx, dy = (width - side) // 2, (height - side) // 2
    for i in range(12):  # two of each tag
        image, caption, meta = make_sample_sized(i, 1, width, height)
        ref_image, ref_caption, ref_meta = make_sample(i, 1, side)
        assert image.size == (width, height) and (meta["width"], meta["height"]) == (width, height)
        px = pixels(image)
        assert np.array_equal(px[dy:dy + side, dx:dx + side], pixels(ref_image))
        padding = np.ones((height, width), bool)
        padding[dy:dy + side, dx:dx + side] = False
        assert (px[padding] == BACKGROUND).all()
        assert caption == ref_caption
        assert {k: v for k, v in meta.items() if k not in ("width", "height", "objects")} == \
               {k: v for k, v in ref_meta.items() if k not in ("width", "height", "objects")}
        for obj, ref in zip(meta["objects"], ref_meta["objects"], strict=True):
            x0, y0, x1, y1 = ref["box"]
            assert obj["box"] == [x0 + dx, y0 + dy, x1 + dx, y1 + dy]
            assert {k: v for k, v in obj.items() if k != "box"} == {k: v for k, v in ref.items() if k != "box"}
        if meta["tag"] == "position":  # a translation keeps GenEval's verdict
            rel = parse_caption(caption)[2]
            assert geneval_relations(meta["objects"][0]["box"], meta["objects"][1]["box"]) == {rel}


def test_make_sample_sized_rejects_a_side_below_the_minimum():
    from t2i.data.shapes import MIN_SIZE, make_sample_sized

    with pytest.raises(ValueError, match=f">= {MIN_SIZE} px"):
        make_sample_sized(0, 0, 96, MIN_SIZE - 1)
