"""t2i.data.writers and tools.make_shards: shards read back (plain tarfile and webdataset) to exactly
what was written, byte-identical rewrites, and a captioned image folder with the bad cases counted."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from t2i.data.shapes import BACKGROUND, make_sample
from t2i.data.writers import sanitize_key, write_folder_shards, write_shapes_shards
from t2i.errors import DataError
from tools.make_shards import main

N, PER_SHARD = 25, 10


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_tar(path):
    """{key: {ext: bytes}} in member order, with plain tarfile; also returns the member headers."""
    samples, members = {}, []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append(m)
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples, members


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    paths = write_shapes_shards(out, N, samples_per_shard=PER_SHARD, seed=3, progress=False)
    return out, paths


def test_shapes_shards_have_the_right_names_and_counts(shapes_dir):
    out, paths = shapes_dir
    assert [Path(p).name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == [Path(p).name for p in paths]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [{"name": Path(p).name, "samples": n} for p, n in zip(paths, (10, 10, 5))]
    assert manifest["num_samples"] == N and manifest["num_shards"] == 3
    assert manifest["args"] == {"n": N, "samples_per_shard": PER_SHARD, "seed": 3, "size": 64, "prefix": "shapes"}


def test_plain_tarfile_reads_back_exactly_the_generated_samples(shapes_dir):
    _, paths = shapes_dir
    index = 0
    for path in paths:
        samples, members = read_tar(path)
        assert all(m.mtime == 0 and m.mode == 0o444 and m.isfile() for m in members)
        for key, fields in samples.items():
            image, caption, meta = make_sample(index, seed=3)
            assert key == f"{index:08d}" and set(fields) == {"png", "txt", "json"}
            assert fields["txt"].decode() == caption
            assert json.loads(fields["json"]) == meta
            decoded = Image.open(io.BytesIO(fields["png"]))
            assert decoded.format == "PNG"
            assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))  # lossless
            index += 1
    assert index == N


def test_webdataset_reads_back_the_same_keys_captions_json_and_pixels(shapes_dir):
    _, paths = shapes_dir
    ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil")
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"{i:08d}" for i in range(N)]
    for i, s in enumerate(got):
        image, caption, meta = make_sample(i, seed=3)
        assert s["txt"] == caption and s["json"] == meta
        assert np.array_equal(np.asarray(s["png"].convert("RGB")), np.asarray(image))


def test_rewriting_gives_byte_identical_shards_and_manifest(shapes_dir, tmp_path):
    out, paths = shapes_dir
    again = write_shapes_shards(tmp_path, N, samples_per_shard=PER_SHARD, seed=3, progress=False)
    assert [sha256(p) for p in again] == [sha256(p) for p in paths]
    assert (tmp_path / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    other_seed = write_shapes_shards(tmp_path / "s4", N, samples_per_shard=PER_SHARD, seed=4, progress=False)
    assert sha256(other_seed[0]) != sha256(paths[0])


def test_existing_shards_are_refused_unless_overwrite_and_then_stale_ones_go(tmp_path):
    write_shapes_shards(tmp_path, 12, samples_per_shard=4, progress=False)  # 3 shards
    with pytest.raises(DataError, match=r"^--out .* already holds 3 shard\(s\) \(shapes-000000.tar, \.\.\.\); "
                                        r"pass --overwrite"):
        write_shapes_shards(tmp_path, 4, samples_per_shard=4, progress=False)
    paths = write_shapes_shards(tmp_path, 4, samples_per_shard=4, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shapes-000000.tar"] == [Path(p).name for p in paths]


def test_cli_shapes_matches_the_library_call(shapes_dir, tmp_path):
    out, paths = shapes_dir
    cli = main(["shapes", "--out", str(tmp_path), "--n", str(N), "--per-shard", str(PER_SHARD), "--seed", "3",
                "--no-progress"])
    assert [sha256(p) for p in cli] == [sha256(p) for p in paths]


# the shards (and manifest) of `shapes_dir` as written before --aspects existed (Pillow 12/13 PNG encoder)
SHARDS_BEFORE_ASPECTS = ["51e5fdd1db0221c76a79cfd21a9066315240068160787cda7ee91685adde9a96",
                         "59349937487c511bb4aa588ec5b3cc455238cd75a10e15481fcb57772bc91cba",
                         "c3fcee6dca46ef2068b75d7ea888c722bce37ee1e88da368c7ce24d194f51dd2"]
MANIFEST_BEFORE_ASPECTS = "c446ef5a911e7b03591caf1a8ecf3fb3e9f83f3d3a0422b490f4a54f7dfa8ccc"
SAMPLE0_PNG = "2badca2a2061aefbde88bddf1126d26b972c8e29610b3d116fd8e3f32aae53e1"  # the encoder those were made with


def test_default_shapes_shards_are_byte_identical_to_before_aspects(shapes_dir, tmp_path):
    from t2i.data.writers import _png_bytes

    out, paths = shapes_dir
    explicit = write_shapes_shards(tmp_path, N, samples_per_shard=PER_SHARD, seed=3, progress=False, aspects=None)
    assert [sha256(p) for p in explicit] == [sha256(p) for p in paths]
    if hashlib.sha256(_png_bytes(make_sample(0, seed=3)[0])).hexdigest() != SAMPLE0_PNG:
        pytest.skip("this Pillow/zlib encodes PNG differently from the one the pinned hashes were made with")
    assert [sha256(p) for p in paths] == SHARDS_BEFORE_ASPECTS
    assert sha256(out / "manifest.json") == MANIFEST_BEFORE_ASPECTS


def is_background(px):
    return (px == np.asarray(BACKGROUND)).all(-1)


def test_shapes_aspects_give_the_sizes_in_turn_padded_with_boxes_shifted(tmp_path):
    out = tmp_path / "ar"
    paths = main(["shapes", "--out", str(out), "--n", "7", "--per-shard", "4", "--seed", "5",
                  "--aspects", "64x64,96x64,64x96", "--no-progress"])
    samples = {}
    for p in paths:
        samples.update(read_tar(p)[0])
    assert list(samples) == [f"{i:08d}" for i in range(7)]
    sizes = [(64, 64), (96, 64), (64, 96)]
    for i, fields in enumerate(samples.values()):
        width, height = sizes[i % 3]
        image = Image.open(io.BytesIO(fields["png"]))
        meta = json.loads(fields["json"])
        assert image.format == "PNG" and image.size == (width, height)
        assert (meta["width"], meta["height"]) == (width, height)
        _, caption, square_meta = make_sample(i, seed=5, size=64)  # min(W, H) is 64 for all three
        assert fields["txt"].decode() == caption == meta["caption"]
        dx, dy = (width - 64) // 2, (height - 64) // 2
        px = np.asarray(image.convert("RGB"), dtype=np.int64)
        outside = np.ones((height, width), bool)
        for obj, ref in zip(meta["objects"], square_meta["objects"], strict=True):
            x0, y0, x1, y1 = obj["box"]
            assert obj["box"] == [ref["box"][0] + dx, ref["box"][1] + dy, ref["box"][2] + dx, ref["box"][3] + dy]
            # the box is tight around pixels of the object's colour in the padded image
            on = (px[y0:y1, x0:x1] == np.asarray(obj["rgb"])).all(-1)
            assert on.any(0).all() and on.any(1).all()
            assert not is_background(px[y0:y1, x0:x1]).all()
            outside[y0:y1, x0:x1] = False
        assert is_background(px[outside]).all()  # the padding and the rest: background only
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"] == {"n": 7, "samples_per_shard": 4, "seed": 5, "prefix": "ar",
                                "aspects": ["64x64", "96x64", "64x96"]}
    # the library call with (w, h) pairs writes the same bytes
    again = write_shapes_shards(tmp_path / "lib", 7, samples_per_shard=4, seed=5, prefix="ar", progress=False,
                                aspects=sizes)
    assert [sha256(p) for p in again] == [sha256(p) for p in paths]


def test_shapes_aspects_are_checked(tmp_path, capsys):
    from t2i.cli import main as t2i
    from t2i.data.writers import parse_aspects
    from t2i.errors import ConfigError

    assert parse_aspects("64x64, 96X64 ,64") == [(64, 64), (96, 64), (64, 64)]
    with pytest.raises(DataError, match=r"^--aspects: each side must be >= 32 px.*got 96x16$"):
        parse_aspects("64x64,96x16")
    with pytest.raises(DataError, match="at least one size"):
        parse_aspects(" , ")
    with pytest.raises(ConfigError, match="^--aspects: 'wide' is not a size"):
        parse_aspects("64x64,wide")
    assert t2i(["make-shards", "shapes", "--out", str(tmp_path / "x"), "--n", "3", "--aspects", "96x20",
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--aspects" in err and not list(tmp_path.glob("x/*.tar"))


# ---------------------------------------------------------------------------------------------
# Folder -> shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def save(rel, size, fmt, caption):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(src / rel, format=fmt)
        if caption is not None:
            (src / rel).with_suffix(".txt").write_text(caption + "\n")

    save("a.png", (20, 12), "PNG", "a red thing")
    save("sub/b.jpg", (16, 24), "JPEG", "a jpeg")
    save("sub/deeper/c.v2.jpeg", (8, 8), "JPEG", "dots in the name")
    save("d.webp", (10, 14), "WEBP", "a webp")
    save("no_caption.png", (8, 8), "PNG", None)
    (src / "corrupt.png").write_bytes(b"not an image at all")
    (src / "corrupt.txt").write_text("a broken file")
    (src / "notes.txt").write_text("a caption with no image")
    return src


def test_folder_shards_copy_bytes_and_count_skips(image_folder, tmp_path):
    out = tmp_path / "out"
    paths = write_folder_shards(image_folder, out, samples_per_shard=2, prefix="imgs", progress=False)
    assert [Path(p).name for p in paths] == ["imgs-000000.tar", "imgs-000001.tar", "imgs-000002.tar"]
    samples = {}
    for p in paths:
        samples.update(read_tar(p)[0])
    expected = {  # key: (source, ext, caption, width, height); sorted by relative path
        "a": ("a.png", "png", "a red thing", 20, 12),
        "corrupt": ("corrupt.png", "png", "a broken file", None, None),
        "d": ("d.webp", "webp", "a webp", 10, 14),
        "sub_b": ("sub/b.jpg", "jpg", "a jpeg", 16, 24),
        "sub_deeper_c_v2": ("sub/deeper/c.v2.jpeg", "jpg", "dots in the name", 8, 8),
    }
    assert list(samples) == list(expected)
    for key, (source, ext, caption, w, h) in expected.items():
        fields = samples[key]
        assert set(fields) == {ext, "txt", "json"}
        assert fields[ext] == (image_folder / source).read_bytes()  # copied, not re-encoded
        assert fields["txt"].decode() == caption
        assert json.loads(fields["json"]) == {"width": w, "height": h, "source": source}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"images_found": 6, "written": 5, "skipped_no_caption": 1,
                                  "unreadable_image": 1, "renamed_keys": 0, "caption_invalid_utf8": 0}
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    # webdataset groups the members into the same five samples (the corrupt one decodes later, in the loader)
    raw = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in raw] == list(expected)
    # and the CLI writes the same bytes
    cli = main(["folder", "--src", str(image_folder), "--out", str(tmp_path / "cli"), "--per-shard", "2",
                "--prefix", "imgs", "--no-progress"])
    assert [sha256(p) for p in cli] == [sha256(p) for p in paths]


def test_folder_shards_keep_the_aspect_ratio_and_record_the_size(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(src / "wide.png")  # 3:2
    Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(src / "tall.jpg", quality=80)  # 2:3
    for name in ("wide", "tall"):
        (src / f"{name}.txt").write_text(f"a {name} picture")
    paths = write_folder_shards(src, tmp_path / "out", progress=False)
    samples = read_tar(paths[0])[0]
    assert samples["wide"]["png"] == (src / "wide.png").read_bytes()
    assert json.loads(samples["wide"]["json"]) == {"width": 60, "height": 40, "source": "wide.png"}
    assert samples["tall"]["jpg"] == (src / "tall.jpg").read_bytes()
    assert json.loads(samples["tall"]["json"]) == {"width": 32, "height": 48, "source": "tall.jpg"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["args"]["square"] is None


def test_folder_square_writes_square_images_in_the_source_format(image_folder, tmp_path):
    from t2i.data.decode import resize_center_crop

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image_folder / "e.webp", lossless=True)
    (image_folder / "e.txt").write_text("a lossless webp")
    out = tmp_path / "sq"
    paths = main(["folder", "--src", str(image_folder), "--out", str(out), "--per-shard", "3", "--prefix", "sq",
                  "--square", "32", "--no-progress"])
    samples = {}
    for p in paths:
        samples.update(read_tar(p)[0])
    formats = {"a": ("png", "PNG"), "d": ("webp", "WEBP"), "e": ("webp", "WEBP"), "sub_b": ("jpg", "JPEG"),
               "sub_deeper_c_v2": ("jpg", "JPEG")}
    assert sorted(samples) == sorted([*formats, "corrupt"])
    for key, (ext, fmt) in formats.items():
        fields = samples[key]
        assert set(fields) == {ext, "txt", "json"}
        image = Image.open(io.BytesIO(fields[ext]))
        meta = json.loads(fields["json"])
        assert image.format == fmt and image.size == (32, 32) and (meta["width"], meta["height"]) == (32, 32)
        source = Image.open(image_folder / meta["source"])
        expected = np.asarray(resize_center_crop(source.convert("RGB"), 32), dtype=np.int64)
        got = np.asarray(image.convert("RGB"), dtype=np.int64)
        if key in ("a", "e"):  # PNG, lossless WebP: exactly the resized crop
            assert np.array_equal(got, expected)
        else:  # JPEG / lossy WebP at quality 95
            assert np.abs(got - expected).mean() < 12
    assert samples["corrupt"]["png"] == (image_folder / "corrupt.png").read_bytes()  # copied as it is
    assert json.loads(samples["corrupt"]["json"]) == {"width": None, "height": None, "source": "corrupt.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["square"] == 32
    assert manifest["counts"] == {"images_found": 7, "written": 6, "skipped_no_caption": 1,
                                  "unreadable_image": 1, "renamed_keys": 0, "caption_invalid_utf8": 0}
    # deterministic: a rerun writes the same bytes
    again = write_folder_shards(image_folder, tmp_path / "again", samples_per_shard=3, prefix="sq", square=32,
                                progress=False)
    assert [sha256(p) for p in again] == [sha256(p) for p in paths]
    with pytest.raises(DataError, match="--square"):
        write_folder_shards(image_folder, tmp_path / "bad", square=0, progress=False)


def test_colliding_keys_are_renamed_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("x.y.png", "x_y.png"):  # both sanitise to "x_y"
        Image.new("RGB", (4, 4)).save(src / name)
        (src / name).with_suffix(".txt").write_text("c")
    paths = write_folder_shards(src, tmp_path / "out", progress=False)
    assert list(read_tar(paths[0])[0]) == ["x_y", "x_y_2"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["renamed_keys"] == 1


def test_sanitize_key_removes_dots_and_slashes():
    assert sanitize_key("a/b.c/d e.v1.jpg") == "a_b_c_d_e_v1"


def test_empty_folder_writes_no_shards(tmp_path):
    (tmp_path / "src").mkdir()
    assert write_folder_shards(tmp_path / "src", tmp_path / "out", progress=False) == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_shards"] == 0


# ---------------------------------------------------------------------------------------------
# The command a new user runs: names, the pattern to paste, --help, a rerun
# ---------------------------------------------------------------------------------------------


def test_folder_shards_are_named_after_out_and_the_printed_pattern_reads_them(image_folder, tmp_path, capsys,
                                                                               monkeypatch):
    from t2i.cli import main as t2i
    from t2i.data.shards import expand_shards

    monkeypatch.chdir(tmp_path)  # the README's relative paths
    assert t2i(["make-shards", "folder", "--src", str(image_folder), "--out", "data/mine", "--per-shard", "2",
                "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "train on them with: data.shards='data/mine/mine-{000000..000002}.tar'"
    assert sorted(p.name for p in (tmp_path / "data" / "mine").glob("*.tar")) == [
        "mine-000000.tar", "mine-000001.tar", "mine-000002.tar"]
    pattern = out[-1].split("'")[1]
    assert expand_shards(pattern) == [f"data/mine/mine-{i:06d}.tar" for i in range(3)]
    # a rerun is one line naming --overwrite; --overwrite replaces the shards (fewer now: none stale)
    assert t2i(["make-shards", "folder", "--src", str(image_folder), "--out", "data/mine", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert t2i(["make-shards", "folder", "--src", str(image_folder), "--out", "data/mine", "--per-shard", "4",
                "--no-progress", "--overwrite"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "train on them with: data.shards='data/mine/mine-{000000..000001}.tar'"
    assert sorted(p.name for p in (tmp_path / "data" / "mine").glob("*.tar")) == ["mine-000000.tar", "mine-000001.tar"]


def test_overwrite_also_removes_the_shards_an_earlier_manifest_lists_under_another_prefix(tmp_path):
    out = tmp_path / "mine"
    write_shapes_shards(out, 6, samples_per_shard=2, prefix="images", progress=False)
    main(["shapes", "--out", str(out), "--n", "2", "--per-shard", "2", "--no-progress", "--overwrite"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["mine-000000.tar"]


def test_one_shard_is_named_without_braces_and_prefixes_are_plain_names(tmp_path):
    from t2i.data.writers import default_prefix, shard_pattern

    assert shard_pattern("data/mine", "mine", 1) == "data/mine/mine-000000.tar"
    assert shard_pattern("data/mine", "mine", 12) == "data/mine/mine-{000000..000011}.tar"
    assert default_prefix("data/mine/") == "mine" and default_prefix("data/my photos") == "my_photos"
    assert default_prefix(tmp_path / "shapes-val") == "shapes-val"


def test_help_names_the_t2i_command_and_shows_the_defaults(capsys):
    from t2i.cli import main as t2i

    for sub in ("folder", "shapes"):
        with pytest.raises(SystemExit) as e:
            t2i(["make-shards", sub, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith(f"usage: t2i make-shards {sub} ")
        assert "samples per shard (default: 1000)" in text
        assert "(default: the --out folder's name, so --out data/mine writes data/mine/mine-000000.tar, ...)" in text
    assert "image side in pixels (default: 64)" in text and "(default: 0)" in text  # shapes: --size, --seed
