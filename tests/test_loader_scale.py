"""Loader and text defaults that matter at scale: small images refused by data.min_size, a warning
with the read amplification when shards are fewer than reading slots, 256 T5 tokens for SD3 presets."""

import logging
import random

import pytest

from conftest import png_bytes
from t2i.config import DataConfig, TextEncoderConfig, load_config
from t2i.data.decode import decode_sample
from t2i.data.loader import TrainLoader, slot_stream
from t2i.errors import DataError


def raw(size: int) -> dict:
    return {"__key__": "k", "png": png_bytes((200, 10, 10), size=size), "txt": b"a red square"}


def test_images_smaller_than_min_size_are_bad_not_upscaled():
    rng = random.Random(0)
    assert decode_sample(raw(16), 32, rng, min_size=24) == (None, "small")
    sample, reason = decode_sample(raw(24), 32, rng, min_size=24)
    assert reason is None and sample["image"].shape == (3, 32, 32)
    assert decode_sample(raw(16), 32, rng)[1] is None  # 0 = any size, as before


def test_min_size_is_counted_by_the_loader(make_shards):
    shards = make_shards(n_shards=1, per_shard=6)  # 16 px images
    small = DataConfig(shards=shards, resolution=16, shuffle_buffer=2, min_size=20)
    with pytest.raises(DataError, match=r"read no usable sample .*'small': 6"):
        next(slot_stream(shards, small, seed=0, slot=0, n_slots=1))
    fits = DataConfig(shards=shards, resolution=16, shuffle_buffer=2, min_size=16)
    assert next(slot_stream(shards, fits, seed=0, slot=0, n_slots=1))["counts"].get("small", 0) == 0


def test_fewer_shards_than_slots_warns_with_the_amplification(make_shards, caplog):
    shards = make_shards(n_shards=2, per_shard=4)
    with caplog.at_level(logging.WARNING):
        TrainLoader(DataConfig(shards=shards, resolution=16, num_workers=2), seed=0, rank=0, world_size=4,
                    batch_size=1)
    assert "2 shard(s) for 8 reading slots (4 rank(s) x 2 worker(s))" in caplog.text
    assert "read 8x" in caplog.text and "at least 8 shards" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TrainLoader(DataConfig(shards=shards, resolution=16), seed=0, rank=0, world_size=2, batch_size=1)
    assert "reading slots" not in caplog.text


def test_sd3_text_presets_default_to_the_pipelines_256_t5_tokens(tmp_path):
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):  # what loading checks for
        (tmp_path / sub).mkdir()
    assert TextEncoderConfig(preset="sd3", sd3_folder=str(tmp_path)).max_t5_tokens == 256
    assert TextEncoderConfig().max_t5_tokens == 64
    user = tmp_path / "mine.yaml"
    user.write_text(f"text: {{preset: sd3, sd3_folder: {tmp_path}, clip_context: 77}}\n")
    assert load_config(user).text.max_t5_tokens == 256
    assert load_config(user, ["text.max_t5_tokens=128"]).text.max_t5_tokens == 128
