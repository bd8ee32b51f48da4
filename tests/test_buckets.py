"""Aspect-ratio buckets: the sets (rule, list) against hand-computed values, assignment in log aspect, the
cover crop, the config and geometry checks, and the bucketed loader: one bucket per micro-batch, bounded
buffers, 'aspect' counted once, exact resume at every stop (buffers holding samples of an older epoch)."""

import itertools
import json
import logging
import math

import pytest
from PIL import Image

from t2i.config import DataConfig, load_config
from t2i.buckets import bucket_set, parse_size, rule_sizes
from t2i.data.decode import header_size, metadata_size, resize_cover_crop
from t2i.data.decode import resize_center_crop
from t2i.data.loader import TrainLoader, bucket_counts
from t2i.errors import ConfigError
from t2i.models.geometry import check_geometry

SIZES = [(16, 16), (24, 16), (16, 24), (16, 16), (40, 16), (24, 16)]  # as in tests/test_train_resume.py
NAME = {(16, 16): "16x16", (24, 16): "20x12", (16, 24): "12x20"}


def test_the_rule_at_1024_squared_is_sdxls_set_within_two_to_one():
    # Per height h (multiple of 64) the widest w (multiple of 64) with w*h <= 1024^2, by hand:
    # 1024 -> 1024, 960 -> 1088, 896 -> 1152, 832 -> 1216, 768 -> 1344, 704 -> 1472 (2.09:1, out of [0.5, 2]).
    want = [(1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1344, 768)]
    sizes = rule_sizes(1024 * 1024, 64, 0.5, 2.0)
    assert set(sizes) == set(want) | {(h, w) for w, h in want} and len(sizes) == 9
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert sizes == sorted(sizes, key=lambda s: s[0] / s[1])
    # the SD3.5-medium config's area: 512^2
    assert bucket_set({}, 512).names == ["384x640", "448x576", "512x512", "576x448", "640x384"]


def test_an_image_goes_to_the_bucket_nearest_in_log_aspect():
    b = bucket_set({"area": 1024 * 1024}, 1024)
    names = b.names
    assert names[b.assign(1920, 1080)] == "1344x768"   # 16:9 = 1.78; 1344/768 = 1.75
    assert names[b.assign(1000, 1000)] == "1024x1024"
    assert names[b.assign(3000, 4000)] == "896x1152"   # 0.75; 896/1152 = 0.778 vs 832/1216 = 0.684
    assert b.assign(2100, 1000) is None and b.assign(1000, 2100) is None  # beyond 2:1
    # log space: 1.2 lies between 1088/960 = 1.133 and 1152/896 = 1.286; |log| distances 0.0572 vs 0.0690
    assert names[b.assign(1200, 1000)] == "1088x960"
    assert abs(math.log(1.2 / (1088 / 960))) < abs(math.log((1152 / 896) / 1.2))


def test_an_explicit_list_takes_aspects_within_ten_percent_of_its_extremes():
    b = bucket_set(["1024x1024", "1216x832", "832x1216"], 1024)
    assert b.names == ["832x1216", "1024x1024", "1216x832"]
    assert b.max_aspect == pytest.approx(1216 / 832 * 1.1) and b.min_aspect == pytest.approx(832 / 1216 / 1.1)
    assert b.names[b.assign(1600, 1000)] == "1216x832" and b.assign(1920, 1080) is None
    assert b.sample_sizes() == [(1024, 1024), (1216, 832)]


@pytest.mark.parametrize("size", [(16, 16), (40, 24), (24, 40), (7, 3), (200, 120)])
def test_the_cover_crop_is_the_square_crop_on_a_square_and_keeps_the_centre(size):
    image = Image.new("RGB", size)
    image.putpixel((size[0] // 2, size[1] // 2), (255, 0, 0))
    # reference: the square crop as written before buckets (short side -> 12, bicubic, centre 12 x 12)
    w, h = size
    scale = 12 / min(w, h)
    ref = image.resize((max(12, round(w * scale)), max(12, round(h * scale))), Image.BICUBIC,
                       reducing_gap=None if scale > 1 else 3.0) if scale != 1 else image
    left, top = (ref.size[0] - 12) // 2, (ref.size[1] - 12) // 2
    ref = ref.crop((left, top, left + 12, top + 12))
    assert resize_cover_crop(image, (12, 12)).tobytes() == ref.tobytes() == resize_center_crop(image, 12).tobytes()
    out = resize_cover_crop(image, (20, 12))
    assert out.size == (20, 12)


def test_sizes_come_from_the_json_or_the_header_without_decoding():
    import io
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, "PNG")
    assert metadata_size({"json": json.dumps({"width": 300, "height": 200}).encode()}) == (300, 200)
    assert metadata_size({"json": b'{"width": "300"}'}) is None and metadata_size({"json": b"not json"}) is None
    assert header_size(buf.getvalue()) == (30, 20) and header_size(b"garbage") is None


def test_sizes_parse_as_width_by_height():
    assert parse_size("1216x832") == (1216, 832) and parse_size("512") == (512, 512) and parse_size(64) == (64, 64)
    with pytest.raises(ConfigError, match="--resolution: '12x' is not a size"):
        parse_size("12x")


@pytest.mark.parametrize("value,match", [
    ("{stp: 64}", "unknown config key 'data.buckets.stp'; did you mean 'data.buckets.step'"),
    ("[]", "data.buckets is an empty list"),
    ("[32x32, 32x32]", "data.buckets lists 32x32 twice"),
    ("[32x32, 33]", None),
    ("{min_aspect: 1.5}", "must bracket 1"),
    ("{area: 16, step: 8}", "gives no bucket"),
    ("[wide]", "data.buckets entry 'wide': 'wide' is not a size"),
])
def test_a_bad_bucket_value_is_refused_naming_the_key(value, match):
    if match is None:  # well formed; the model's check refuses the side 33 (not a multiple of 4)
        with pytest.raises(ConfigError, match=r"data.buckets: bucket 33x33 has a side that is not a multiple of 4"):
            check_geometry(load_config(overrides=[f"data.buckets={value}"]))
        return
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[f"data.buckets={value}"])


def test_a_bucket_past_the_positional_grid_is_refused_before_start_up():
    cfg = load_config(overrides=["data.buckets=[32x32, 64x16]", "model.kwargs={pos_embed_max_size: 8}"])
    with pytest.raises(ConfigError, match=r"bucket 64x16 has a side of 64 px, past the model's positional grid "
                                          r"of 32 px \(VAE downsampling 1 x patch size 4; positional grid 8 "):
        check_geometry(cfg)
    check_geometry(load_config(overrides=["data.buckets=[32x32, 64x16]"]))  # tiny from scratch: grid covers it


def test_the_sd35_configs_ship_a_multi_aspect_set_that_fits_their_model():
    from conftest import REPO
    for name, area in (("sd3.5-medium-512", 512), ("sd3.5-large-1024", 1024)):
        from t2i.config import read_yaml
        data = read_yaml(REPO / "configs" / f"{name}.yaml")
        b = bucket_set(data["data"]["buckets"], data["data"]["resolution"])
        assert data["data"]["resolution"] == area and len(b.sizes) >= 5
        assert all(w * h <= area * area and w % 64 == 0 and h % 64 == 0 for w, h in b.sizes)
        assert max(max(s) for s in b.sizes) <= 192 * 2 * 8  # both models' grids: >= 192 patches of 2 x VAE 8


# ----------------------------------------------------------------------------------------------
# The bucketed loader
# ----------------------------------------------------------------------------------------------


def bucketed(urls, **kw):
    return DataConfig(shards=urls, resolution=16, buckets={"step": 4}, **{"shuffle_buffer": 8, **kw})


def test_every_micro_batch_holds_one_bucket_at_its_size_and_the_buffers_stay_bounded(make_shards):
    urls = make_shards(n_shards=2, per_shard=12, sizes=SIZES)
    loader = TrainLoader(bucketed(urls), seed=0, rank=0, world_size=1, batch_size=3)
    seen = set()
    for _ in range(12):
        batch = next(loader)
        w, h = map(int, batch["bucket"].split("x"))
        assert batch["images"].shape == (3, 3, h, w)
        sizes = {SIZES[int(k.rsplit("_", 1)[1]) % 6] for k in batch["keys"]}
        assert {NAME[s] for s in sizes} == {batch["bucket"]}
        assert loader.waiting() <= 3 * (3 - 1)  # n_buckets x (micro-batch - 1)
        seen.add(batch["bucket"])
    assert seen == {"12x20", "16x16", "20x12"}
    c = bucket_counts(loader)
    assert sum(c["images_per_bucket"].values()) == 36 and c["waiting"] == loader.waiting()
    # 40x16 is out of range: 2 of every 12 samples, counted once each as 'aspect'
    assert c["dropped_aspect"] == loader.counts()["aspect"] > 0
    epochs_read = loader.counts()["good"] + loader.counts()["aspect"]
    assert loader.counts()["aspect"] == pytest.approx(epochs_read / 6, abs=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bucketed_loader_resumes_exactly_at_every_stop(make_shards, num_workers):
    """Stopped after k batches (k = 1 .. 9) and resumed from its state (through JSON, as a checkpoint would
    hold it), the loader gives the same next batches as an uninterrupted one; some of the stops hold samples
    of an earlier epoch than the stream's, which the resume re-reads from that epoch."""
    urls = make_shards(n_shards=4, per_shard=9, sizes=SIZES)  # 9: epochs end with samples left in the buffers
    cfg = bucketed(urls, num_workers=num_workers)
    straight = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4)
    expected = [(b["keys"], b["bucket"]) for b in itertools.islice(straight, 15)]
    older_epoch_held = 0
    for stop in range(1, 10):
        first = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4)
        got = [(b["keys"], b["bucket"]) for b in itertools.islice(first, stop)]
        state = json.loads(json.dumps(first.state_dict()))
        state["workers"] = {int(k): v for k, v in state["workers"].items()}
        older_epoch_held += any(e < w["epoch"] for w in state["workers"].values() for e, _ in w.get("waiting", []))
        resumed = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4, state=state)
        got += [(b["keys"], b["bucket"]) for b in itertools.islice(resumed, 15 - stop)]
        assert got == expected, stop
        assert resumed.counts() == straight.counts()  # bad ('aspect') and per-bucket counts too, none twice
    assert older_epoch_held > 0


def test_a_forced_change_of_the_bucket_set_drops_the_waiting_samples_and_says_so(make_shards, caplog):
    urls = make_shards(n_shards=2, per_shard=12, sizes=SIZES)
    first = TrainLoader(bucketed(urls), seed=0, rank=0, world_size=1, batch_size=4)
    next(first)
    state = first.state_dict()
    held = sum(len(w["waiting"]) for w in state["workers"].values())
    assert held > 0 and state["buckets"] == ["12x20", "16x16", "20x12"]
    other = DataConfig(shards=urls, resolution=16, buckets=["16x16", "20x12", "12x20", "24x8"], shuffle_buffer=8)
    with caplog.at_level(logging.WARNING):
        resumed = TrainLoader(other, seed=0, rank=0, world_size=1, batch_size=4, state=state)
    assert f"{held} sample(s) waiting in the old buckets' buffers are dropped, not moved" in caplog.text
    assert resumed.waiting() == 0 and next(resumed)["bucket"] in {"12x20", "16x16", "20x12", "24x8"}


def test_a_square_loader_state_is_what_it_was_before_buckets(make_shards):
    urls = make_shards(n_shards=2, per_shard=6)
    loader = TrainLoader(DataConfig(shards=urls, resolution=8, shuffle_buffer=8), seed=0, rank=0, world_size=1,
                         batch_size=4)
    batch = next(loader)
    assert "bucket" not in batch and batch["images"].shape == (4, 3, 8, 8)
    state = loader.state_dict()
    assert set(state) == {"num_workers", "next_worker", "workers"} and set(state["workers"][0]) == {
        "epoch", "index", "counts"}
    assert not any(k.startswith("bucket/") for k in state["workers"][0]["counts"])
    assert bucket_counts(loader) == {}


def test_the_run_sample_grid_draws_two_buckets_when_buckets_are_on():
    from t2i.models.build import build_for, build_frozen
    from t2i.train.live_eval import grid_samples

    cfg = load_config(overrides=["data.buckets={step: 8}", "sample.steps=1", "sample.prompts=[a, b]"])
    text, vae = build_frozen(cfg)
    images, labels = grid_samples(cfg, build_for(cfg, text, vae), text, vae, None)
    assert [tuple(i.shape[1:]) for i in images] == [(32, 32), (24, 40)] * 2  # (height, width): 32x32 and 40x24
    assert labels == ["a (32x32)", "a (40x24)", "b (32x32)", "b (40x24)"]
    square = load_config(overrides=["sample.steps=1", "sample.prompts=[a, b]"])
    images, labels = grid_samples(square, build_for(square, text, vae), text, vae, None)
    assert images.shape == (4, 3, 32, 32) and labels == ["a", "a", "b", "b"]


def test_a_forced_smaller_micro_batch_keeps_the_waiting_samples_in_their_buckets(make_shards):
    urls = make_shards(n_shards=2, per_shard=12, sizes=SIZES)
    first = TrainLoader(bucketed(urls), seed=0, rank=0, world_size=1, batch_size=4)
    next(first)
    state = first.state_dict()
    held = sorted(tuple(p) for w in state["workers"].values() for p in w["waiting"])
    assert len(held) >= 2
    resumed = TrainLoader(bucketed(urls), seed=0, rank=0, world_size=1, batch_size=1, state=state)
    batches = [next(resumed) for _ in range(len(held))]
    # the waiting samples come out first, one per micro-batch, each in the bucket it waited in
    assert all(len(b["keys"]) == 1 and b["bucket"] == NAME[SIZES[int(b["keys"][0].rsplit("_", 1)[1]) % 6]]
               for b in batches)
    assert resumed.waiting() == 0


def test_the_bucket_numbers_reach_wandb_under_their_own_keys():
    from t2i.train.logger import _flatten
    flat = _flatten({"images_per_bucket": {"12x20": 8, "16x16": 16}, "waiting": 5, "dropped_aspect": 2,
                     "bad": {"aspect": 2}}, "train/")
    assert flat == {"train/images_per_bucket/12x20": 8, "train/images_per_bucket/16x16": 16, "train/waiting": 5,
                    "train/dropped_aspect": 2, "train/bad/aspect": 2}


def test_img2dataset_keep_ratio_samples_are_bucketed_from_their_json_without_decoding():
    """img2dataset's webdataset output (resize_mode keep_ratio) writes the final width and height in each
    sample's json: the bucket (or the 'aspect' drop) is decided from it; the image is not decoded for that."""
    import io
    import random

    from t2i.data.decode import decode_sample

    b = bucket_set({"step": 8}, 32)
    meta = {"url": "http://x/y.jpg", "caption": "a cat", "key": "000000001", "status": "success",
            "width": 60, "height": 36, "original_width": 1200, "original_height": 720, "exif": "{}"}
    buf = io.BytesIO()
    Image.new("RGB", (60, 36), (10, 200, 30)).save(buf, "JPEG")
    raw = {"__key__": "000000001", "jpg": buf.getvalue(), "txt": b"a cat", "json": json.dumps(meta).encode()}
    sample, reason = decode_sample(raw, 32, random.Random(0), buckets=b)
    assert reason is None and b.names[sample["bucket"]] == "40x24" and sample["image"].shape == (3, 24, 40)
    # out of range by its json: dropped for aspect; the (undecodable) bytes are never opened
    wide = dict(raw, jpg=b"not an image", json=json.dumps({**meta, "width": 100, "height": 36}).encode())
    assert decode_sample(wide, 32, random.Random(0), buckets=b) == (None, "aspect")
    # no size in the json: the header decides (an undecodable image stays a bad 'image')
    no_size = dict(raw, json=json.dumps({"caption": "a cat"}).encode())
    assert b.names[decode_sample(no_size, 32, random.Random(0), buckets=b)[0]["bucket"]] == "40x24"
    assert decode_sample(dict(no_size, jpg=b"junk"), 32, random.Random(0), buckets=b) == (None, "image")
