"""Streaming shards: splitting, exact resume, bad samples, shard lists."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_bytes, sample_members, write_tar
from t2i.config import DataConfig
from t2i.errors import DataError
from t2i.data.loader import TrainLoader, slot_stream
from t2i.data.shards import expand_shards
from t2i.data.decode import resize_center_crop


def cfg_for(shards, **kw):
    return DataConfig(shards=shards, resolution=8, **{"shuffle_buffer": 8, **kw})


def take_keys(stream, n):
    return [s["key"] for s in itertools.islice(stream, n)]


def test_ranks_read_disjoint_shards_whose_union_is_the_epoch(make_shards):
    urls = make_shards(n_shards=4, per_shard=10)
    cfg = cfg_for(urls)
    per_rank = [take_keys(slot_stream(urls, cfg, seed=1, slot=r, n_slots=2), 20) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {f"s{s}_{i:03d}" for s in range(4) for i in range(10)}
    # each rank's share is whole shards
    for keys in per_rank:
        assert {k.split("_")[0] for k in keys} and all(
            sum(k.startswith(p + "_") for k in keys) == 10 for p in {k.split("_")[0] for k in keys})


def test_fewer_shards_than_ranks_splits_by_sample(make_shards):
    urls = make_shards(n_shards=1, per_shard=12)
    cfg = cfg_for(urls)
    a = take_keys(slot_stream(urls, cfg, seed=0, slot=0, n_slots=2), 6)
    b = take_keys(slot_stream(urls, cfg, seed=0, slot=1, n_slots=2), 6)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 12


def test_stream_is_deterministic_shuffled_and_continues_into_new_epochs(make_shards):
    urls = make_shards(n_shards=2, per_shard=10)
    cfg = cfg_for(urls)
    one = take_keys(slot_stream(urls, cfg, seed=3, slot=0, n_slots=1), 45)
    two = take_keys(slot_stream(urls, cfg, seed=3, slot=0, n_slots=1), 45)
    other_seed = take_keys(slot_stream(urls, cfg, seed=4, slot=0, n_slots=1), 45)
    assert one == two and one != other_seed
    assert sorted(one[:20]) == sorted(one[20:40])          # each epoch is a permutation of all samples
    assert one[:20] != one[20:40]                          # ... reshuffled per epoch
    assert one[:20] != sorted(one[:20])                    # ... and not in file order


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 5])
def test_resumed_loader_continues_with_the_next_unseen_sample(make_shards, num_workers, stop):
    urls = make_shards(n_shards=4, per_shard=9)
    cfg = cfg_for(urls, num_workers=num_workers)
    straight = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4)
    expected = [next(straight)["keys"] for _ in range(stop + 6)]
    first = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4)
    got = [next(first)["keys"] for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation (keys become str)
    state["workers"] = {int(k): v for k, v in state["workers"].items()}
    resumed = TrainLoader(cfg, seed=5, rank=1, world_size=2, batch_size=4, state=state)
    got += [next(resumed)["keys"] for _ in range(6)]
    assert got == expected


def test_resume_with_other_worker_count_is_refused(make_shards):
    urls = make_shards(n_shards=2, per_shard=4)
    loader = TrainLoader(cfg_for(urls), seed=0, rank=0, world_size=1, batch_size=2)
    next(loader)
    with pytest.raises(DataError, match="num_workers"):
        TrainLoader(cfg_for(urls, num_workers=2), seed=0, rank=0, world_size=1, batch_size=2,
                    state=loader.state_dict())


def test_bad_samples_are_skipped_and_counted(tmp_path):
    members = sample_members("good0") + sample_members("good1")
    members += [("badimg.png", b"not a png at all"), ("badimg.txt", b"a caption")]   # undecodable image
    members += sample_members("nocap", caption=None)                                   # no caption
    members += [("emptycap.png", png_bytes((0, 0, 255))), ("emptycap.txt", b"   ")]    # empty caption
    members += [("jsoncap.png", png_bytes((0, 255, 0))),
                ("jsoncap.json", json.dumps({"captions": ["a photo of a green square"]}).encode())]
    shard = write_tar(tmp_path / "mixed.tar", members)
    cfg = cfg_for(str(shard), shuffle_buffer=1)  # file order: the good json-caption sample comes last
    samples = list(itertools.islice(slot_stream([str(shard)], cfg, 0, 0, 1), 3))
    assert sorted(s["key"] for s in samples) == ["good0", "good1", "jsoncap"]
    counts = samples[-1]["counts"]
    assert (counts["image"], counts["caption"], counts["good"]) == (1, 2, 3)
    assert next(s for s in samples if s["key"] == "jsoncap")["caption"] == "a photo of a green square"


def test_truncated_shard_is_counted_and_the_next_shard_still_read(tmp_path):
    full = write_tar(tmp_path / "a.tar", sum((sample_members(f"a{i}") for i in range(6)), []))
    data = full.read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2 + 100])   # cut inside the header of a3.txt
    other = write_tar(tmp_path / "b.tar", sum((sample_members(f"b{i}") for i in range(3)), []))
    urls = [str(full), str(other)]
    cfg = cfg_for(urls, shuffle_buffer=1)
    stream = slot_stream(urls, cfg, seed=0, slot=0, n_slots=1)
    keys, counts = [], None
    for s in itertools.islice(stream, 20):
        if s["pos"][0] > 0:
            break
        keys.append(s["key"])
        counts = s["counts"]
    assert {"b0", "b1", "b2"} <= set(keys) and sorted(k for k in keys if k.startswith("a")) == ["a0", "a1", "a2"]
    # once, as a shard that ends early; the partial a3 (png only) is dropped, not also a bad caption
    assert (counts["short_shard"], counts["read"], counts["image"], counts["caption"]) == (1, 0, 0, 0)


def test_too_many_bad_samples_fail_with_the_counts(tmp_path):
    members = []
    for i in range(10):
        members += sample_members(f"k{i}") if i < 5 else [(f"k{i}.png", b"junk"), (f"k{i}.txt", b"cap")]
    shard = write_tar(tmp_path / "bad.tar", members)
    loader = TrainLoader(cfg_for(str(shard), max_bad_fraction=0.2, bad_check_after=8), seed=0, rank=0,
                         world_size=1, batch_size=2)
    with pytest.raises(DataError, match=r"max_bad_fraction=20.0%.*image=4"):
        for _ in range(20):
            next(loader)


def test_shard_specs_brace_list_dir_listfile_and_pipe(make_shards, tmp_path):
    urls = make_shards(n_shards=3, per_shard=2)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_shards(pattern) == urls
    assert expand_shards(urls) == urls
    assert expand_shards(str(tmp_path)) == urls
    listfile = tmp_path / "shards.txt"
    listfile.write_text("# my shards\n" + "\n".join(urls) + "\n")
    assert expand_shards(str(listfile)) == urls
    pipe = [f"pipe:cat {u}" for u in urls]
    assert take_keys(slot_stream(pipe, cfg_for(pipe, shuffle_buffer=1), 0, 0, 1), 6) and \
        sorted(take_keys(slot_stream(pipe, cfg_for(pipe), 0, 0, 1), 6)) == \
        sorted(take_keys(slot_stream(urls, cfg_for(urls), 0, 0, 1), 6))
    with pytest.raises(DataError, match="not found"):
        expand_shards(str(tmp_path / "missing-{0..1}.tar"))


def test_resize_center_crop_keeps_the_middle():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255                                     # a white band in the middle 40 columns
    out = np.asarray(resize_center_crop(Image.fromarray(img), 20))
    assert out.shape == (20, 20, 3)
    assert out[:, 1:-1].min() >= 250 and out.min() > 200   # the white middle only (bicubic edge blur)


def test_images_are_scaled_to_minus_one_one(tmp_path):
    shard = write_tar(tmp_path / "c.tar", sample_members("k", color=(255, 0, 128)))
    s = next(slot_stream([str(shard)], cfg_for(str(shard)), 0, 0, 1))
    assert s["image"].shape == (3, 8, 8)
    torch.testing.assert_close(s["image"][:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
