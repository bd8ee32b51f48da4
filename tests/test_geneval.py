"""GenEval's official rules (docs/design/evaluation.md §1.5–1.6) on hand-built detections with hand-computed results,
the folder validation, the summary, and the shapes prompt set."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i import geneval_spec
from t2i.eval import geneval
from t2i.eval.geneval import Detection, Options
from t2i.errors import EvalError

from conftest import REPO

NAMES = ["person", "dog", "cat"]
OFFICIAL = REPO.parent / "shared" / "geneval" / "evaluation_metadata.jsonl"


def det(label, score, box=(0, 0, 10, 10)):
    return Detection(label, score, tuple(box))


def fixed_colors(mapping):
    """A colour classifier that answers from a {id(detection): colour} table and records its calls."""
    calls = []

    def classify(objects, name):
        calls.append((name, len(objects)))
        return [mapping[id(o)] for o in objects]
    classify.calls = calls
    return classify


# ---------------------------------------------------------------- step A: thresholds, cap, NMS


def test_threshold_is_strict_and_counting_uses_the_stricter_one_for_every_class():
    dets = [det(0, 0.3), det(0, 0.31), det(1, 0.85), det(1, 0.95), det(2, 0.9)]
    kept = geneval.keep_objects(dets, NAMES, "two_object")
    assert [d.score for d in kept["person"]] == [0.31]            # 0.3 is not > 0.3
    assert [d.score for d in kept["dog"]] == [0.95, 0.85]          # best first
    assert [d.score for d in kept["cat"]] == [0.9]
    kept = geneval.keep_objects(dets, NAMES, "counting")
    assert "person" not in kept and "cat" not in kept             # 0.9 is not > 0.9
    assert [d.score for d in kept["dog"]] == [0.95]


def test_at_most_16_objects_per_class_are_kept_and_exclude_counts_after_the_cap():
    dets = [det(1, 0.5 + i / 100) for i in range(20)]
    kept = geneval.keep_objects(dets, NAMES, "single_object")
    assert len(kept["dog"]) == 16 and kept["dog"][0].score == pytest.approx(0.69)
    assert geneval.judge(kept, {"include": [{"class": "dog", "count": 1}],
                                "exclude": [{"class": "dog", "count": 17}]})[0]
    assert not geneval.judge(kept, {"include": [], "exclude": [{"class": "dog", "count": 16}]})[0]


def test_nms_is_off_by_default_and_uses_plus_one_iou_when_on():
    a, b = det(0, 0.9, (0, 0, 9, 9)), det(0, 0.8, (0, 0, 9, 4))   # areas 100 and 50, IoU 0.5 (+1 convention)
    assert geneval._iou(a.box, b.box) == pytest.approx(0.5)
    assert len(geneval.keep_objects([a, b], NAMES, "counting", Options(counting_threshold=0.5))["person"]) == 2
    assert len(geneval.keep_objects([a, b], NAMES, "counting", Options(counting_threshold=0.5,
                                                                         max_overlap=0.5))["person"]) == 1
    assert len(geneval.keep_objects([a, b], NAMES, "counting", Options(counting_threshold=0.5,
                                                                         max_overlap=0.6))["person"]) == 2


# ---------------------------------------------------------------- step B: counts, colours, exclude


def test_counting_needs_exactly_n_through_include_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    for n, expected, reason in [(2, False, "expected cat>=3, found 2"), (3, True, ""),
                                (4, False, "expected cat<4, found 4")]:
        kept = {"cat": [det(2, 0.95)] * n}
        assert geneval.judge(kept, meta) == (expected, reason)


def test_colour_is_checked_on_the_first_count_objects_only():
    red, blue = det(1, 0.9), det(1, 0.8)
    classify = fixed_colors({id(red): "red", id(blue): "blue"})
    meta = {"include": [{"class": "dog", "count": 1, "color": "blue"}]}
    correct, reason = geneval.judge({"dog": [red, blue]}, meta, classify)
    assert not correct and reason == "expected blue dog>=1, found 0 blue; and 1 red"
    assert classify.calls == [("dog", 1)]
    assert geneval.judge({"dog": [blue, red]}, meta, classify) == (True, "")


def test_a_missing_object_is_not_colour_classified_and_all_failures_are_reported():
    classify = fixed_colors({})
    meta = {"include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 2}],
            "exclude": [{"class": "person", "count": 1}]}
    correct, reason = geneval.judge({"cat": [det(2, 0.9)], "person": [det(0, 0.4)]}, meta, classify)
    assert not correct and classify.calls == []
    assert reason.split("\n") == ["expected dog>=1, found 0", "expected cat>=2, found 1", "expected person<1, found 1"]


# ---------------------------------------------------------------- step D: relative position


@pytest.mark.parametrize("box_a, box_b, expected", [
    ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),                 # offset (−20, 0): dx = −18/20
    ((20, 0, 30, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 20, 10, 30), {"above"}),                   # image y grows downward
    ((0, 20, 10, 30), (0, 0, 10, 10), {"below"}),
    ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),       # (−18, −18)/28.28 = −0.636 each
    ((0, 0, 10, 10), (0.5, 0, 10.5, 10), set()),                    # revised offset 0: no relation at all
    ((0, 0, 10, 10), (12, 20, 22, 30), {"above"}),                  # dx = −9.8/23.3 = −0.42, dy = −0.77
])
def test_relative_position_matches_hand_computation(box_a, box_b, expected):
    assert geneval_spec.relations(box_a, box_b) == expected


def test_relative_position_normalises_by_the_original_offset():
    dx, dy = geneval_spec.relative_offset((0, 0, 10, 10), (12, 20, 22, 30))
    norm = math.hypot(12, 20)
    assert (dx, dy) == pytest.approx((-(12 - 2) / norm, -(20 - 2) / norm))
    assert geneval_spec.relative_offset((0, 0, 10, 10), (0, 0, 10, 10)) is None


def test_position_needs_a_matched_target_and_every_pair_to_hold():
    target, left, right = det(1, 0.9, (40, 0, 50, 10)), det(2, 0.9, (0, 0, 10, 10)), det(2, 0.8, (80, 0, 90, 10))
    meta = {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    assert geneval.judge({"dog": [target], "cat": [left, right]}, meta) == (True, "")
    assert geneval.judge({"dog": [target], "cat": [right, left]}, meta) == (
        False, "expected cat left of target, found right of target")
    meta2 = {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 2, "position": ["left of", 0]}]}
    assert not geneval.judge({"dog": [target], "cat": [left, right]}, meta2)[0]
    assert geneval.judge({"cat": [left]}, meta) == (False, "expected dog>=1, found 0\nno target for cat to be left of")


def test_evaluate_image_writes_the_official_record():
    meta = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"}
    dets = [det(2, 0.5, (1, 2, 3, 4)), det(2, 0.2), det(0, 0.9)]

    class Red:
        name, colors = "red-only", ["red"]

        def __call__(self, image, objects, class_name):
            return ["red"] * len(objects)
    r = geneval.evaluate_image(Image.new("RGB", (8, 8)), dets, meta, NAMES, Red(), filename="x/00000/samples/0000.png")
    assert list(r) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert r["correct"] is True and json.loads(r["metadata"]) == meta
    assert json.loads(r["details"]) == {"person": [[0, 0, 10, 10, 0.9]], "cat": [[1, 2, 3, 4, 0.5]]}
    with pytest.raises(ValueError, match="colour classifier"):
        geneval.evaluate_image(Image.new("RGB", (8, 8)), dets, meta, NAMES, None)


# ---------------------------------------------------------------- aggregation


def official_summary(results_path):
    """summary_scores.py's arithmetic, transliterated from its pandas calls (groupby tag / metadata)."""
    rows = [json.loads(line) for line in open(results_path)]
    tags = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(r["correct"])
    task_scores = [sum(v) / len(v) for v in tags.values()]
    prompts = {}
    for r in rows:
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or r["correct"]
    return {"overall": float(np.mean(task_scores)), "images": len(rows), "prompts": len(prompts),
            "correct_images": float(np.mean([r["correct"] for r in rows])),
            "correct_prompts": float(np.mean(list(prompts.values())))}


def test_summary_is_the_mean_of_tag_means_over_images(tmp_path):
    records = []
    plan = {"single_object": [1, 1, 1, 0], "two_object": [1, 0, 0, 0, 0, 0, 0, 0], "counting": [0, 0]}
    for tag, outcomes in plan.items():
        for i, ok in enumerate(outcomes):
            meta = json.dumps({"tag": tag, "prompt": f"{tag} {i // 2}"})  # two images per prompt
            records.append({"filename": f"{tag}{i}", "tag": tag, "correct": bool(ok), "metadata": meta})
    s = geneval.summarize(records)
    assert s["tags"]["single_object"]["score"] == 0.75 and s["tags"]["two_object"]["score"] == 0.125
    assert s["overall"] == pytest.approx((0.75 + 0.125 + 0.0) / 3)           # not 4/14 (the image mean)
    assert s["correct_images"] == pytest.approx(4 / 14)
    assert s["correct_prompts"] == pytest.approx(3 / 7)                      # any image correct
    path = geneval.write_results(records, tmp_path / "results.jsonl")
    official = official_summary(path)
    for key in official:
        assert s[key] == pytest.approx(official[key])
    assert "| **overall (mean of tags)** | **0.2917** |" in geneval.summary_table(s)


# ---------------------------------------------------------------- folders and validation


def make_folder(root: Path, metas: list[dict], n_images: int, skip=(), short=None):
    for p, meta in enumerate(metas):
        if p in skip:
            continue
        d = root / f"{p:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for k in range((short or {}).get(p, n_images)):
            (d / "samples" / f"{k:04d}.png").write_bytes(b"")
    return root


def test_list_images_follows_the_official_acceptance_rules(tmp_path):
    make_folder(tmp_path, [{"prompt": "a"}], 2)
    (tmp_path / "00000" / "samples" / ".0002.png.1.tmp").write_bytes(b"half")   # an interrupted write
    (tmp_path / "00000" / "samples" / "grid.png").write_bytes(b"")
    (tmp_path / "00000" / "samples" / "0003.jpg").write_bytes(b"")
    (tmp_path / "geneval").mkdir()
    found = geneval.list_images(tmp_path)
    assert list(found) == [0] and [p.name for p in found[0][1]] == ["0000.png", "0001.png"]


@pytest.mark.skipif(not OFFICIAL.exists(), reason="GenEval's prompt files (../shared/geneval) are not here")
def test_validation_names_exactly_what_is_missing_from_the_official_set(tmp_path):
    metas = geneval.read_metadata(OFFICIAL)
    assert len(metas) == 553
    assert {t: sum(m["tag"] == t for m in metas) for t in geneval_spec.TAGS} == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    make_folder(tmp_path, metas, 4, skip={100, 550, 551, 552}, short={7: 3, 8: 0})
    problems = geneval.validate(geneval.list_images(tmp_path), metas, 4)
    assert problems == ["4 of 553 prompt folders missing: 00100, 00550-00552",
                        "2 prompt folders do not have 4 images: 00007 (3), 00008 (0)"]
    assert geneval.validate(geneval.list_images(make_folder(tmp_path / "ok", metas, 4)), metas, 4) == []


def test_validation_reports_wrong_metadata_and_extra_folders(tmp_path):
    metas = [{"tag": "single_object", "prompt": f"p{i}"} for i in range(3)]
    make_folder(tmp_path, [*metas[:2], {"prompt": "other"}, {"prompt": "extra"}], 1)
    problems = geneval.validate(geneval.list_images(tmp_path), metas, 1)
    assert problems == ["1 prompt folders beyond the 3 prompts: 00003",
                        "1 prompt folders' metadata differ from the prompt set: 00002 (first: 'other' vs 'p2')"]


# ---------------------------------------------------------------- the shapes prompt set


def test_shapes_prompt_set_has_geneval_structure(tmp_path):
    from t2i.data.shapes import COLORS, SHAPES
    from t2i.eval.prompts import load_prompts, write_shapes_geneval

    path = write_shapes_geneval(tmp_path, per_tag=8)
    entries = load_prompts(str(path))
    tags = [e["tag"] for e in entries]
    assert tags == sorted(tags, key=geneval_spec.TAGS.index)                       # grouped in GenEval's order
    counts = {t: tags.count(t) for t in geneval_spec.TAGS}
    assert counts == {"single_object": 3, "two_object": 6, "counting": 8, "colors": 8, "position": 8,
                      "color_attr": 8}
    assert len({e["prompt"] for e in entries}) == len(entries)                 # de-duplicated
    for e in entries:
        assert list(e) == (["tag", "include", "exclude", "prompt"] if e["tag"] == "counting"
                           else ["tag", "include", "prompt"])
        for c in e["include"]:
            assert c["class"] in SHAPES and c.get("color", "red") in COLORS
    assert (tmp_path / "object_names.txt").read_text().split() == list(SHAPES)
    assert (tmp_path / "generation_prompts.txt").read_text().splitlines() == [e["prompt"] for e in entries]
    assert all(m["prompt"] == "a photo of " + m["prompt"][len("a photo of "):] for m in entries)
    pos = [e for e in entries if e["tag"] == "position"][0]
    assert pos["include"][1]["position"][1] == 0


def test_the_shapes_prompt_set_can_be_cut_to_some_tags_and_refuses_an_unknown_one(tmp_path):
    from t2i.eval.prompts import load_prompts, write_shapes_geneval

    entries = load_prompts(str(write_shapes_geneval(tmp_path / "one", per_tag=8, tags=["single_object", "colors"])))
    full = load_prompts(str(write_shapes_geneval(tmp_path / "all", per_tag=8)))
    assert entries == [e for e in full if e["tag"] in ("single_object", "colors")] and len(entries) == 3 + 8
    assert {e["prompt"] for e in entries if e["tag"] == "single_object"} == {f"a photo of a {s}" for s in
                                                                           ("circle", "square", "triangle")}
    with pytest.raises(ValueError, match="unknown GenEval tag.*'single'"):
        write_shapes_geneval(tmp_path / "bad", tags=["single"])


# ---------------------------------------------------------------- the exact shapes backend on real shards


@pytest.mark.parametrize("size, min_accuracy", [(64, 1.0), (32, 0.95)])
def test_shapes_backend_scores_ground_truth_shards(tmp_path, size, min_accuracy):
    """Images decoded from real shards, scored from pixels by the GenEval backend: the detections match
    the stored ground truth (same shapes; boxes within the 2x2 opening that trims a triangle's apex)
    and the official rules accept (almost) every ground-truth image."""
    import webdataset as wds

    from t2i.data.writers import write_shapes_shards
    from t2i.eval.shapes_detector import ShapesColorClassifier, ShapesDetector

    shards = write_shapes_shards(tmp_path, n=120, samples_per_shard=60, seed=5, size=64, progress=False)
    detector, colors = ShapesDetector(), ShapesColorClassifier()
    correct, boxes_equal = [], []
    for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"):
        meta, image = s["json"], s["png"].convert("RGB")
        if size != 64:
            image = image.resize((size, size), Image.NEAREST)
        dets = detector([image])[0]
        record = geneval.evaluate_image(image, dets, meta | {"prompt": s["txt"]}, detector.class_names, colors)
        correct.append(record["correct"])
        if size == 64:
            want = sorted((o["shape"], tuple(o["box"])) for o in meta["objects"])
            got = sorted((SHAPES_[d.label], d.box) for d in dets)
            boxes_equal.append([w[0] for w in want] == [g[0] for g in got] and all(
                np.abs(np.subtract(w[1], g[1])).max() <= 2 for w, g in zip(want, got, strict=True)))
    accuracy = float(np.mean(correct))
    print(f"shapes backend accuracy on ground truth at {size}px: {accuracy:.3f} ({len(correct)} images)")
    assert accuracy >= min_accuracy
    assert all(boxes_equal)


SHAPES_ = ["circle", "square", "triangle"]


def test_geneval_cli_scores_a_folder_and_refuses_an_incomplete_one(tmp_path):
    from t2i.data.shapes import make_sample
    from t2i.eval.prompts import write_prompts
    from pipelines.geneval import score

    metas = []
    for p, index in enumerate(itertools.islice(range(100), 6)):
        image, caption, meta = make_sample(index, seed=3, size=64)
        entry = {k: meta[k] for k in ("tag", "include", "exclude") if k != "exclude" or meta[k]} | {"prompt": caption}
        metas.append(entry)
        d = tmp_path / "s" / f"{p:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        image.save(d / "samples" / "0000.png")
        Image.new("RGB", (64, 64), (215, 215, 215)).save(d / "samples" / "0001.png")   # blank: always wrong
    prompts = write_prompts(metas, tmp_path / "prompts.jsonl")
    summary = score(tmp_path / "s", prompts=str(prompts), progress=False)
    assert summary["overall"] == pytest.approx(0.5) and summary["images"] == 12
    assert all(t["score"] == 0.5 for t in summary["tags"].values())
    results = [json.loads(line) for line in open(tmp_path / "s" / "geneval" / "results.jsonl")]
    assert [r["correct"] for r in results] == [True, False] * 6
    (tmp_path / "s" / "00003" / "samples" / "0001.png").unlink()
    with pytest.raises(EvalError, match=r"1 prompt folders do not have 2 images: 00003 \(1\)"):
        score(tmp_path / "s", prompts=str(prompts), images_per_prompt=2, progress=False)
