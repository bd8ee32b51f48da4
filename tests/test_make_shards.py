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

from t2i.data.shapes import make_sample
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
