"""Precomputed caches (t2i/data/cache.py, `t2i cache`, data.cache): the cached training path gives the
uncached one's values and losses; bf16 + t5_padding=zero stores T5 trimmed; stale caches are refused;
a killed build resumes without rewriting valid files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import png_bytes, write_tar
from helpers import REPO, losses, tiny_train_args

from t2i.train.step import encode_batch
from t2i.data import cache
from t2i.config import load_config
from t2i.data.loader import TrainLoader
from t2i.errors import CacheError, DataError
from t2i.models.build import build_frozen
from tools.cache import main as cache_main


def _json_caption_shard(path):
    """Samples with several json captions, plus one undecodable image and one without a caption."""
    members = []
    for i in range(6):
        caps = [f"a photo of {n} red squares number {i}" for n in ("one", "two", "three")]
        members += [(f"j{i:02d}.png", png_bytes((40 * i, 255 - 30 * i, 90))),
                    (f"j{i:02d}.json", json.dumps({"captions": caps}).encode())]
    members += [("jbad.png", b"not an image"), ("jbad.txt", b"a broken image")]
    members += [("jnocap.png", png_bytes((1, 2, 3)))]
    return str(write_tar(path, members))


@pytest.fixture
def shards(make_shards, tmp_path):
    return make_shards(n_shards=2, per_shard=6) + [_json_caption_shard(tmp_path / "json-000000.tar")]


def _cfg(shards, *extra):
    return load_config(overrides=[f"data.shards={shards}", "data.resolution=16", "data.shuffle_buffer=8",
                                  "data.bad_check_after=100000", *extra])


def _build(cfg_args, out, *extra):
    assert cache_main(["--out", str(out), "--no-progress", *extra, *cfg_args]) == 0


@pytest.mark.parametrize("vae_kind", ["identity", "tiny"])
def test_cached_batches_equal_the_uncached_path(shards, tmp_path, vae_kind):
    over = [f"vae.kind={vae_kind}", "vae.latent_channels=4"]
    _build([f"data.shards={shards}", "data.resolution=16", *over], tmp_path / "c", "--dtype", "float32")
    cfg = _cfg(shards, *over)
    cached_cfg = _cfg(shards, *over, f"data.cache={tmp_path / 'c'}")
    text, vae = build_frozen(cfg)
    plain = TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=5)
    cached = TrainLoader(cached_cfg.data, seed=0, rank=0, world_size=1, batch_size=5,
                         cache_identity=cache.identity(text, vae, cfg))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(5):  # > one epoch: every caption variant, the bad samples, caption dropout
        a, b = next(plain), next(cached)
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and "images" not in b
        xa, ca = encode_batch(text, vae, a, g1, torch.device("cpu"), torch.float32)
        xb, cb = encode_batch(text, vae, b, g2, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(xb, xa, atol=1e-6, rtol=1e-6)
        for k in ("context", "pooled"):
            torch.testing.assert_close(cb[k], ca[k], atol=1e-6, rtol=1e-6)
        assert torch.equal(g1.get_state(), g2.get_state())  # same generator consumption
    assert plain.counts() == cached.counts() and plain.counts()["image"] >= 1 and plain.counts()["caption"] >= 1
    assert plain.state_dict() == cached.state_dict()


def test_cached_loader_resumes_and_reads_in_workers(shards, tmp_path):
    _build([f"data.shards={shards}", "data.resolution=16"], tmp_path / "c")
    cfg = _cfg(shards, f"data.cache={tmp_path / 'c'}")
    text, vae = build_frozen(cfg)
    ident = cache.identity(text, vae, cfg)
    full = TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4, cache_identity=ident)
    batches = [next(full) for _ in range(4)]
    first = TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4, cache_identity=ident)
    next(first), next(first)
    resumed = TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4, state=first.state_dict(),
                          cache_identity=ident)
    assert [next(resumed)["keys"] for _ in range(2)] == [b["keys"] for b in batches[2:]]
    workers = _cfg(shards, f"data.cache={tmp_path / 'c'}", "data.num_workers=1")
    w = next(TrainLoader(workers.data, seed=0, rank=0, world_size=1, batch_size=4, cache_identity=ident))
    assert w["keys"] == batches[0]["keys"] and w["cache"]["clip"].dtype == torch.bfloat16
    assert all(torch.equal(w["cache"][k], batches[0]["cache"][k]) for k in w["cache"])
    with pytest.raises(DataError, match="no cache_identity"):
        TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4)


def test_bf16_zero_padding_stores_t5_trimmed(shards, tmp_path):
    args = [f"data.shards={shards}", "data.resolution=16", "text.t5_padding=zero"]
    _build(args, tmp_path / "c")  # default dtype: bfloat16
    cfg = _cfg(shards, "text.t5_padding=zero")
    text, vae = build_frozen(cfg)
    path = cache.cache_path(tmp_path / "c", _shard(shards, "json-000000"))
    meta = cache.read_meta(path)
    assert meta["store_dtype"] == "bfloat16" and meta["t5_tokens"] == "trimmed" and meta["samples"] == "8"
    shard = cache.ShardCache(path)
    assert shard.index["bad"] == {"jbad": "image", "jnocap": "caption"}
    captions = [f"a photo of {n} red squares number {i}" for i in range(6) for n in ("one", "two", "three")]
    rows = [shard.index["samples"][f"j{i:02d}"][1][cache.caption_hash(c)]
            for i in range(6) for c in captions[3 * i:3 * i + 3]]
    assert rows == list(range(18))
    stored = torch.tensor(shard.offsets).diff()
    real = text.t5_lengths(text.tokenize(captions)["t5"])
    assert torch.equal(stored, real) and (real < text.cfg.max_t5_tokens).all()
    assert shard.file.get_slice("t5").get_shape()[0] == int(real.sum())

    items = [shard.lookup(f"j{i // 3:02d}", c)[0] for i, c in enumerate(captions)]
    assert items[0]["clip"].dtype == torch.bfloat16
    context, pooled = cache.conditioning(text, cache.collate(items))
    ref_ctx, ref_pooled = text.encode(captions)
    C = text.cfg.clip_context
    for i, n in enumerate(real.tolist()):  # zero padding: exactly 0 after </s>, so trimming is exact
        assert (ref_ctx[i, C + n:] == 0).all() and (ref_ctx[i, C + n - 1] != 0).any()
    torch.testing.assert_close(context, ref_ctx, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(pooled, ref_pooled, atol=2e-2, rtol=1e-2)
    keep = build_frozen(_cfg(shards))[0].encode(captions)[0]  # keep: the pad positions carry values
    assert (keep[0, C + int(real[0]):] != 0).any()


@pytest.mark.parametrize("override, field", [("text.seed=1", "text.seed"), ("data.resolution=8", "resolution"),
                                             ("text.t5_padding=zero", "t5_padding")])
def test_stale_cache_is_refused_naming_the_field(shards, tmp_path, override, field):
    _build([f"data.shards={shards}", "data.resolution=16"], tmp_path / "c")
    cfg = _cfg(shards, override, f"data.cache={tmp_path / 'c'}")
    text, vae = build_frozen(cfg)
    with pytest.raises(CacheError) as err:
        TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4,
                    cache_identity=cache.identity(text, vae, cfg))
    msg = str(err.value)
    assert str(tmp_path / "c") in msg and "3 stale" in msg and field in msg, msg


def test_missing_file_and_changed_shard_are_refused(shards, tmp_path):
    out = tmp_path / "c"
    _build([f"data.shards={shards}", "data.resolution=16"], out)
    cfg = _cfg(shards, f"data.cache={out}")
    text, vae = build_frozen(cfg)
    ident = cache.identity(text, vae, cfg)
    cache.cache_path(out, shards[1]).unlink()
    with pytest.raises(CacheError, match=r"1 of 3 shard cache file\(s\) missing \(first: .*shard-000001"):
        TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4, cache_identity=ident)
    _build([f"data.shards={shards}", "data.resolution=16"], out)
    with open(shards[0], "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(CacheError, match=r"1 stale \(first: .*shard-000000-[0-9a-f]{8}.safetensors: shard size changed"):
        TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=4, cache_identity=ident)


def test_killed_build_is_completed_without_rewriting_valid_files(shards, tmp_path, capsys):
    out = tmp_path / "c"
    args = [f"data.shards={shards}", "data.resolution=16"]
    _build(args, out)
    files = sorted(out.glob("*.safetensors"))
    names = {Path(u).stem: cache.cache_path(out, u).name for u in shards}
    assert [f.name for f in files] == sorted(names.values()) and all(
        re.fullmatch(rf"{stem}-[0-9a-f]{{8}}\.safetensors", n) for stem, n in names.items())
    assert not list(out.glob("*.tmp"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    cache.cache_path(out, shards[1]).unlink()  # a kill mid-shard: no final file, a partial temp one
    (out / (names["shard-000001"] + ".tmp")).write_bytes(b"partial")
    _build(args, out)
    assert "writes 1, 2 already valid" in capsys.readouterr().out
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")}
    assert set(after) == set(before) and not list(out.glob("*.tmp"))
    assert all(after[n] == before[n] for n in (names["json-000000"], names["shard-000000"]))
    assert cache.problem(cache.cache_path(out, shards[1]), shards[1],
                         cache.identity(*build_frozen(_cfg(shards)), _cfg(shards))) is None
    _build(args, out, "--dtype", "float32")  # another store dtype: every file is rewritten
    assert "writes 3, 0 already valid" in capsys.readouterr().out


TRAIN_BOTH = """
import sys
from pathlib import Path
from t2i.cli import main
out, cache_args, plain, cached = sys.argv[1], sys.argv[2].split("\\n"), sys.argv[3].split("\\n"), sys.argv[4].split("\\n")
assert main(["cache", "--out", out, "--dtype", "float32", "--no-progress", *cache_args]) == 0
assert main(["train", *plain]) == 0
assert main(["train", *cached, "data.cache=" + out]) == 0
"""


@pytest.mark.slow  # ~80 s on 2 busy cores: the cache build and two 20-step DeepSpeed runs
def test_training_on_the_cache_gives_the_same_losses(make_shards, tmp_path):
    """20 steps with the tiny VAE (posterior sampling) and caption dropout: the same per-step losses.
    One process runs the cache build and both trainings (the start-up cost is paid once)."""
    shards = make_shards(n_shards=2, per_shard=12)
    spec = "::".join(shards)
    steps = {"train.steps": 20, "vae.kind": "tiny", "vae.latent_channels": 4, "sample.every": 0,
             "sample.geneval_per_tag": 0}
    runs = tmp_path / "runs"
    args = {n: "\n".join(tiny_train_args(spec, runs, n, **steps)) for n in ("plain", "cached")}
    proc = subprocess.run([sys.executable, "-c", TRAIN_BOTH, str(tmp_path / "c"), args["plain"], args["plain"],
                           args["cached"]], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain, cached = losses(runs / "plain"), losses(runs / "cached")
    assert len(plain) == len(cached) == 20
    assert max(abs(a - b) for a, b in zip(plain, cached)) <= 1e-5, (plain, cached)
    assert "data.cache: reading" in (runs / "cached" / "train.log").read_text()


def _shard(shards, stem: str) -> str:
    return next(u for u in shards if Path(u).stem == stem)


def test_two_folders_with_the_same_shard_names_get_different_cache_files(tmp_path):
    a, b = tmp_path / "a" / "00000.tar", tmp_path / "b" / "00000.tar"
    assert cache.cache_path(tmp_path / "c", str(a)) != cache.cache_path(tmp_path / "c", str(b))
    cache.check_unique_names(tmp_path / "c", [str(a), str(b)])  # no clash
    legacy = tmp_path / "c" / "00000.safetensors"  # a cache written before the folder digest
    legacy.parent.mkdir()
    legacy.write_bytes(b"")
    assert cache.cache_path(tmp_path / "c", str(a)) == legacy


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets (data.buckets): latents stored at each sample's bucket size
# ----------------------------------------------------------------------------------------------

BUCKETS = "data.buckets={area: 1024, step: 8}"  # at data.resolution=32: 24x40, 32x32, 40x24
ASPECTS = [(64, 64), (96, 64), (64, 96)]


def _png_sized(color, size) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def aspect_shards(tmp_path):
    """Multi-aspect shapes (json width/height) plus a shard without json: a too-wide image (bad "aspect",
    sized from its header), two tall ones (header-assigned to 24x40) and one without a caption. (Two: the
    tiny VAE's CPU convolution of a batch of one differs from a larger batch's by ~1e-6.)"""
    from t2i.data.writers import write_shapes_shards
    shards = write_shapes_shards(tmp_path / "shapes", 18, samples_per_shard=6, size=64, aspects=ASPECTS,
                                 progress=False)
    extra = write_tar(tmp_path / "odd-000000.tar", [
        ("wide.png", _png_sized((200, 10, 10), (160, 32))), ("wide.txt", b"a very wide red bar"),
        ("tall.png", _png_sized((10, 200, 10), (30, 50))), ("tall.txt", b"a tall green bar"),
        ("tall2.png", _png_sized((10, 10, 200), (33, 52))), ("tall2.txt", b"a tall blue bar"),
        ("nocap.png", _png_sized((1, 2, 3), (40, 40)))])
    return [str(s) for s in shards] + [str(extra)]


def _bcfg(shards, *extra):
    return load_config(overrides=[f"data.shards={shards}", "data.resolution=32", "data.shuffle_buffer=8",
                                  "data.bad_check_after=100000", BUCKETS, *extra])


@pytest.mark.parametrize("vae_kind", ["identity", "tiny"])
def test_bucketed_cache_gives_the_uncached_bucketed_batches(aspect_shards, tmp_path, vae_kind, capsys):
    over = [f"vae.kind={vae_kind}", "vae.latent_channels=4"]
    out = tmp_path / "c"
    _build([f"data.shards={aspect_shards}", "data.resolution=32", BUCKETS, *over], out, "--dtype", "float32",
           "--batch-size", "4")
    summary = capsys.readouterr().out
    cfg = _bcfg(aspect_shards, *over)
    text, vae = build_frozen(cfg)
    ident = cache.identity(text, vae, cfg)
    assert ident["buckets"]["sizes"] == ["24x40", "32x32", "40x24"] and ident["bucket_crop"] == cache.BUCKET_CROP_RULE
    assert ident["crop"] == cache.CROP_RULE
    # 6 + 6 + 6 shapes (64x64 -> 32x32, 96x64 -> 40x24, 64x96 -> 24x40) and the header-sized tall images
    assert "images per bucket in rank 0's 4 file(s): 24x40=8, 32x32=6, 40x24=6" in summary, summary

    # the format: one tensor per bucket present, entries [row, {hash: text row}, "WxH"], bad "aspect"
    f = vae.downsample
    shard = cache.ShardCache(cache.cache_path(out, aspect_shards[0]))  # samples 0..5: 2 per bucket
    image_names = ["image"] if vae_kind == "identity" else ["mean", "std"]
    assert set(shard.file.keys()) == {"clip", "pooled", "t5", "t5_offsets", "index"} | {
        f"{n}@{b}" for n in image_names for b in ("24x40", "32x32", "40x24")}
    for (w, h) in ((24, 40), (32, 32), (40, 24)):
        t = shard.file.get_tensor(f"{image_names[0]}@{w}x{h}")
        assert t.shape == (2, vae.latent_channels, h // f, w // f) and t.dtype == torch.float32
    entries = shard.index["samples"]
    assert sorted((e[2], e[0]) for e in entries.values()) == [(b, r) for b in ("24x40", "32x32", "40x24")
                                                              for r in (0, 1)]
    assert json.loads(cache.read_meta(cache.cache_path(out, aspect_shards[0]))["buckets"]) == {
        "24x40": 2, "32x32": 2, "40x24": 2}
    odd = cache.ShardCache(cache.cache_path(out, aspect_shards[-1]))
    assert odd.index["bad"] == {"wide": "aspect", "nocap": "caption"}
    assert [odd.index["samples"][k][::2] for k in ("tall", "tall2")] == [[0, "24x40"], [1, "24x40"]]
    assert not any("32x32" in k for k in odd.file.keys())  # only the buckets present

    # training: the same batches, buckets and latents as the uncached bucketed path
    cached_cfg = _bcfg(aspect_shards, *over, f"data.cache={out}")
    plain = TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=3)
    cached = TrainLoader(cached_cfg.data, seed=0, rank=0, world_size=1, batch_size=3, cache_identity=ident)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seen = set()
    for _ in range(10):  # > one epoch (20 good samples)
        a, b = next(plain), next(cached)
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and a["bucket"] == b["bucket"]
        assert "images" not in b
        seen.add(b["bucket"])
        xa, ca = encode_batch(text, vae, a, g1, torch.device("cpu"), torch.float32)
        xb, cb = encode_batch(text, vae, b, g2, torch.device("cpu"), torch.float32)
        w, h = map(int, b["bucket"].split("x"))
        assert xb.shape == xa.shape == (3, vae.latent_channels, h // f, w // f)
        if vae_kind == "identity":
            assert torch.equal(xb, xa)
        else:
            torch.testing.assert_close(xb, xa, atol=1e-6, rtol=1e-6)
        for k in ("context", "pooled"):
            torch.testing.assert_close(cb[k], ca[k], atol=1e-6, rtol=1e-6)
        assert torch.equal(g1.get_state(), g2.get_state())
    assert seen == {"24x40", "32x32", "40x24"}
    assert plain.counts() == cached.counts() and plain.counts()["aspect"] >= 1 and plain.counts()["caption"] >= 1
    assert plain.state_dict() == cached.state_dict()


def test_bucket_set_changes_are_refused_naming_data_buckets(aspect_shards, tmp_path):
    shards = aspect_shards[:1]
    bucketed, square = tmp_path / "b", tmp_path / "s"
    _build([f"data.shards={shards}", "data.resolution=32", BUCKETS], bucketed)
    _build([f"data.shards={shards}", "data.resolution=32"], square)

    def refusal(cfg):
        text, vae = build_frozen(cfg)
        with pytest.raises(CacheError) as err:
            TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=2,
                        cache_identity=cache.identity(text, vae, cfg))
        return str(err.value)

    other = refusal(_bcfg(shards, f"data.cache={bucketed}", "data.buckets={area: 1024, step: 16}"))  # 32x32 only
    assert ("1 stale" in other and "buckets (data.buckets): cache [24x40, 32x32, 40x24] (aspects 0.5 to 2), "
            "now [32x32] (aspects 0.5 to 2)" in other), other
    # only the aspect range differs, past the 4 digits shown: the full values
    narrow = refusal(_bcfg(shards, f"data.cache={bucketed}",
                           "data.buckets={area: 1024, step: 8, max_aspect: 2.0000001}"))
    assert "(aspects 0.5 to 2.0), now [24x40, 32x32, 40x24] (aspects 0.5 to 2.0000001)" in narrow, narrow
    off = refusal(_cfg(shards, "data.resolution=32", f"data.cache={bucketed}"))  # buckets now off
    assert "buckets (data.buckets): cache [24x40, 32x32, 40x24]" in off and "now none (square" in off, off
    assert "bucket_crop" not in off, off
    on = refusal(_bcfg(shards, f"data.cache={square}"))  # a square cache, buckets now on
    assert "buckets (data.buckets): cache none (square images at data.resolution), now [24x40" in on, on

    # an entry whose bucket the current set lacks is a bad "cache" sample (a matching identity rules it out)
    import random

    from t2i.buckets import bucket_set
    from t2i.data.shards import raw_samples
    reader = cache.CacheReader(bucketed)
    entries = cache.ShardCache(cache.cache_path(bucketed, shards[0])).index["samples"]
    for raw in raw_samples([shards[0]], {"read": 0, "short_shard": 0}, {}):
        name = entries[raw["__key__"]][2]
        good, _ = reader.sample(raw, random.Random(0), buckets=bucket_set({"area": 1024, "step": 8}, 32))
        assert good["bucket"] == ["24x40", "32x32", "40x24"].index(name)
        missing = bucket_set(["40x24" if name == "32x32" else "32x32"], 32)
        assert reader.sample(raw, random.Random(0), buckets=missing) == (None, "cache")
        assert reader.sample(raw, random.Random(0)) == (None, "cache")  # a bucketed entry read without buckets


def test_square_cache_identity_is_unchanged_by_buckets():
    """The square identity (and so every existing square cache) is what it was before data.buckets existed:
    hashes recorded before the bucket support was added."""
    for over, expected in (([], "528c8f075cd4dec50d133c7c884e23d230cfb41489fabbf89d115febf56414bf"),
                           (["data.resolution=16", "vae.kind=tiny", "vae.latent_channels=4"],
                            "58fca35ff29a611df5e212271cf4ca97c64deb87fa531967afcf0bb0cccc6657")):
        cfg = load_config(overrides=over)
        text, vae = build_frozen(cfg)
        ident = cache.identity(text, vae, cfg)
        assert "buckets" not in ident and "bucket_crop" not in ident and ident["crop"] == cache.CROP_RULE
        assert cache.identity_hash(ident) == expected
        with_buckets = cache.identity(text, vae, load_config(overrides=[*over, BUCKETS]))
        assert cache.identity_hash(with_buckets) != expected and "buckets" in with_buckets
