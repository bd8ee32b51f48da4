"""Issue 11, data part: every bad input is a clear error or a counted bad sample, counted once, nothing lost.

Shard specs (pipe: lines in list files, braces, empty tars), captions (cut, invalid UTF-8, the same
rule in training, cache and sampling prompts), image pixel caps and PIL's decompression-bomb guard,
damaged tars (counted once, never silently short), make-shards' temporary names and manifest, resume.
"""

import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageFile

from conftest import REPO, png_bytes, sample_members, write_tar
from helpers import run_t2i
from t2i.config import DataConfig
from t2i.data import cache as cache_lib
from t2i.data.decode import caption_candidates, clean_caption, decode_sample, read_caption
from t2i.data.loader import COUNT_KEYS, TrainLoader, bad_counts, note_counts, slot_stream
from t2i.data.shards import expand_shards, manifest_counts, raw_samples, read_shards
from t2i.data.writers import write_folder_shards, write_shapes_shards
from t2i.errors import DataError, EvalError
from t2i.eval.prompts import load_prompts


def cfg_for(shards, **kw):
    return DataConfig(shards=shards, resolution=8, **{"shuffle_buffer": 1, **kw})


def shard_of(path, keys, **kw) -> str:
    return str(write_tar(path, sum((sample_members(k, **kw) for k in keys), [])))


def member_offsets(path) -> dict:
    """{member name: (header offset, data offset)}."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def cut(path, at: int) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:at])
    return str(path)


def first_of_epoch(stream, epoch: int) -> dict:
    """The first sample of `epoch`: its counts hold every event of the epochs before (the damaged shards
    here have >= 3 good samples before the damage, more than the reader reads ahead)."""
    return next(s for s in stream if s["pos"][0] == epoch)


# ---------------------------------------------------------------------------------------------
# Shard specs: pipe: in list files, braces, empty tars
# ---------------------------------------------------------------------------------------------


def test_a_pipe_line_in_a_list_file_is_refused_and_runs_nothing(make_shards, tmp_path):
    urls = make_shards(n_shards=2, per_shard=2)
    marker = tmp_path / "ran"
    listfile = tmp_path / "shards.lst"
    listfile.write_text(f"# my shards\n{urls[0]}\npipe:touch {marker}; cat {urls[1]}\n")
    with pytest.raises(DataError, match=rf"^data.shards: line 3 of list file {listfile} is a `pipe:` command "
                                        rf"\('pipe:touch .*'\); commands in a list file are not run unless "
                                        rf"data.allow_pipe_in_lists=true"):
        expand_shards(str(listfile))
    with pytest.raises(DataError, match="line 3 of list file"):
        TrainLoader(cfg_for(str(listfile)), seed=0, rank=0, world_size=1, batch_size=2)
    # however it is spelled or wherever it hides: braces, upper case, a list file named by a list file
    inner = tmp_path / "inner.lst"
    inner.write_text(f"{{pipe:touch {marker},{urls[0]}}}\n")
    outer = tmp_path / "outer.lst"
    outer.write_text(f"{urls[1]}\n{inner}\n")
    with pytest.raises(DataError, match=rf"line 1 of list file {inner} is a `pipe:` command"):
        expand_shards(str(outer))
    listfile.write_text(f"PIPE:touch {marker}\n")
    with pytest.raises(DataError, match="line 1 of list file"):
        expand_shards([str(listfile)])
    assert not marker.exists()


def test_a_pipe_line_in_a_list_file_runs_when_allowed_and_a_direct_pipe_always(make_shards, tmp_path):
    urls = make_shards(n_shards=2, per_shard=3)
    listfile = tmp_path / "shards.lst"
    listfile.write_text(f"{urls[0]}\npipe:cat {urls[1]}\n")
    assert expand_shards(str(listfile), allow_pipe_in_lists=True) == [urls[0], f"pipe:cat {urls[1]}"]
    loader = TrainLoader(cfg_for(str(listfile), allow_pipe_in_lists=True), seed=0, rank=0, world_size=1,
                         batch_size=6)
    assert sorted(next(loader)["keys"]) == [f"s{s}_{i:03d}" for s in range(2) for i in range(3)]
    direct = [urls[0], f"pipe:cat {urls[1]}"]  # in the config itself: the user's own command
    assert expand_shards(direct) == direct


def test_a_directory_listing_never_turns_a_file_name_into_a_pipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    name = "pipe:touch ran;.tar"
    shard_of(tmp_path / name, ["k0", "k1"])
    assert expand_shards(".") == [f"./{name}"]
    keys = [s["key"] for s in itertools.islice(slot_stream(["./" + name], cfg_for("."), 0, 0, 1), 2)]
    assert sorted(keys) == ["k0", "k1"] and not marker.exists()


def test_unbalanced_braces_empty_tars_and_binary_list_files_are_one_line_errors(make_shards, tmp_path):
    with pytest.raises(DataError) as e:
        expand_shards("data/x-{000..002.tar")
    assert str(e.value) == ("data.shards: unbalanced braces in shard pattern 'data/x-{000..002.tar'; a range "
                            "reads e.g. data/x-{000000..000009}.tar")
    listfile = tmp_path / "list.txt"
    listfile.write_text("# shards\ndata/y-{0..3.tar\n")
    with pytest.raises(DataError, match=rf"^validation.shards: unbalanced braces in shard pattern "
                                        rf"'data/y-{{0..3.tar' \(line 2 of list file {listfile}\)"):
        expand_shards(str(listfile), key="validation.shards")
    urls = make_shards(n_shards=2, per_shard=2)
    Path(urls[1]).write_bytes(b"")
    with pytest.raises(DataError) as e:
        expand_shards(urls)
    assert str(e.value) == (f"data.shards: 1 shard(s) are empty files (0 bytes, e.g. from a killed copy or write): "
                            f"['{urls[1]}']; re-create them or leave them out of data.shards")
    binary = tmp_path / "shard.tar.bak"
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"shard.tar.bak is neither a tar shard .* nor a text file listing shards"):
        expand_shards(str(binary))


def test_globs_and_list_files_name_shards_as_brace_patterns_do(tmp_path, monkeypatch):
    """Issue 14: `*`, `?` and `[..]` globs and list files (paths relative to the list file) work wherever
    shards are taken, in the order given, with the same result as the brace range."""
    from conftest import write_sample_shards

    (tmp_path / "digits").mkdir()
    urls = write_sample_shards(tmp_path / "digits", 8, 1, prefix="d")
    monkeypatch.chdir(tmp_path)
    rel = [f"digits/d-{i:06d}.tar" for i in range(8)]
    assert expand_shards("digits/d-{000000..000007}.tar") == rel
    assert expand_shards("digits/*.tar") == rel
    assert expand_shards("digits/d-00000[67].tar", key="--shards") == rel[6:]
    assert expand_shards("digits/d-00000?.tar::digits/d-00000[0].tar") == rel + rel[:1]
    (tmp_path / "lists").mkdir()
    listfile = tmp_path / "lists" / "val.txt"
    listfile.write_text(f"# held out\n../digits/d-00000[67].tar\n../digits/d-{{000000..000001}}.tar\n{urls[2]}\n")
    assert expand_shards("lists/val.txt") == [f"lists/../{r}" for r in rel[6:] + rel[:2]] + [urls[2]]
    # a glob matching nothing, and a missing file, name the flag and the forms a spec takes
    with pytest.raises(DataError) as e:
        expand_shards("../digits/0000[67].tar", key="--shards")
    assert str(e.value) == ("--shards: the glob '../digits/0000[67].tar' matches nothing; a glob must match shard "
                            "files (.tar, .tgz, .gz)")
    listfile.write_text("d-000000.tar\n")  # relative to lists/, not to the working folder
    with pytest.raises(DataError, match=r"^--fid-shards: 1 shard\(s\) not found: .*lists/d-000000.tar'\]; "
                                        r"--fid-shards takes a brace range .*, a glob .*, a list file"):
        expand_shards(str(listfile), key="--fid-shards")
    (tmp_path / "digits" / "notes.json").write_text("{}")
    with pytest.raises(DataError, match=r"the glob 'digits/\*.json' matches only 1 non-shard path"):
        expand_shards("digits/*.json")


def test_every_command_names_its_own_flag_when_shards_are_not_found(tmp_path, capsys):
    """fid ref --shards, eval --fid-shards and bench-loader --shards: one line naming the flag, before any work."""
    from t2i.cli import main

    missing = str(tmp_path / "digits" / "0000[67].tar")
    for argv, flag in ((["fid", "ref", "--shards", missing, "--resolution", "8", "--out", tmp_path / "r.npz"],
                        "--shards"),
                       (["bench-loader", "--shards", missing, "--seconds", "0.1"], "--shards"),
                       (["eval", "--ckpt", f"x={tmp_path}", "--out", tmp_path / "e", "--fid-shards", missing],
                        "--fid-shards")):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"DataError: {flag}: the glob '{missing}' matches nothing" in err, err


# ---------------------------------------------------------------------------------------------
# Captions: one rule (cut, invalid UTF-8) in training, cache and sampling prompts
# ---------------------------------------------------------------------------------------------


def test_clean_caption_cuts_at_a_character_boundary_and_replaces_invalid_utf8():
    counts = {}
    text = "é" * 1500                                          # 3000 bytes
    out = clean_caption(text.encode(), 2047, counts)
    assert out == "é" * 1023 and len(out.encode()) == 2046      # the half character is dropped
    assert counts == {"caption_truncated": 1}
    assert clean_caption("a 🙂 b", 5, counts) == "a" and clean_caption("ab🙂", 5) == "ab"  # 4-byte char
    assert clean_caption("  short  ", 2048, counts) == "short"
    assert clean_caption(b"caf\xe9 \xff bar", 2048, counts) == "caf\ufffd \ufffd bar"
    assert clean_caption("lone \ud800 surrogate", 2048, counts) == "lone \ufffd surrogate"
    assert counts == {"caption_truncated": 2, "caption_invalid_utf8": 2}
    assert clean_caption(b"x" * 5000, None) == "x" * 5000        # None: no cut


def test_loader_counts_cut_and_invalid_captions_without_calling_them_bad(tmp_path):
    long = "a red square " * 400                                # 5200 bytes
    members = sample_members("long", caption=long) + sample_members("ok")
    members += [("bad.png", png_bytes((0, 0, 255))), ("bad.txt", b"a blue \xff\xfe square")]
    members += [("js.png", png_bytes((0, 9, 0))),
                ("js.json", json.dumps({"captions": ["green \ud800 square"]}).encode())]  # escaped surrogate
    shard = str(write_tar(tmp_path / "c.tar", members))
    cfg = cfg_for(shard, max_caption_bytes=100)
    samples = list(itertools.islice(slot_stream([shard], cfg, 0, 0, 1), 4))
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions["long"] == long[:100].rstrip() and captions["ok"] == "a photo of a red square"
    assert captions["bad"] == "a blue \ufffd\ufffd square" and captions["js"] == "green \ufffd square"
    counts = samples[-1]["counts"]
    assert {k: counts[k] for k in ("caption_truncated", "caption_invalid_utf8", "good", "caption", "image")} == \
        {"caption_truncated": 1, "caption_invalid_utf8": 2, "good": 4, "caption": 0, "image": 0}
    loader = TrainLoader(cfg, seed=0, rank=0, world_size=1, batch_size=4)
    next(loader)
    assert note_counts(loader) == {"caption_truncated": 1, "caption_invalid_utf8": 2} and bad_counts(loader) == {}


def test_cache_and_loader_pick_the_same_cut_and_cleaned_captions():
    raw = {"__key__": "k", "json": json.dumps({"captions": ["é" * 40, "ok \ud800", "  ", "ok \ud800"]}).encode()}
    picks = {read_caption(raw, random.Random(i), max_bytes=31) for i in range(50)}
    assert picks == set(cache_lib.all_captions(raw, 31)) == {"é" * 15, "ok \ufffd"}
    counts = {}
    cache_lib.all_captions(raw, 31, counts)
    assert counts == {"caption_truncated": 1, "caption_invalid_utf8": 1}  # per distinct caption stored
    raw_txt = {"__key__": "t", "txt": b"\xffabc", "json": b"{}"}
    assert cache_lib.all_captions(raw_txt) == [read_caption(raw_txt, random.Random(0))] == ["\ufffdabc"]
    # the random draws are those of the old rule (one rng.choice per list caption), so resumes replay
    assert caption_candidates(raw, 31)[0] is True and caption_candidates(raw_txt)[0] is False


def test_the_cache_identity_names_a_non_default_caption_cut_or_pixel_cap():
    text = SimpleNamespace(identity=lambda: {"t": 1})
    vae = SimpleNamespace(identity=lambda: {"v": 1}, kind="sd3")

    def cfg(**data):
        return SimpleNamespace(data=DataConfig(**data), text=SimpleNamespace(t5_padding="zero"),
                               run=SimpleNamespace(seed=0))
    default = cache_lib.identity(text, vae, cfg())
    assert "max_caption_bytes" not in default and "max_image_pixels" not in default  # old caches stay valid
    cut = cache_lib.identity(text, vae, cfg(max_caption_bytes=64))
    assert cache_lib.identity_diff(default, cut) == ["max_caption_bytes: cache None, now 64"]


def test_prompt_files_with_invalid_utf8_long_lines_and_missing_files(tmp_path, caplog):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a caf\xe9 cat\n\n" + b"x" * 3000 + b"\n")
    counts = {}
    with caplog.at_level(logging.WARNING):
        got = load_prompts(str(txt), counts=counts)
    assert got == [{"prompt": "a caf\ufffd cat"}, {"prompt": "x" * 2048}]
    assert counts == {"caption_truncated": 1, "caption_invalid_utf8": 1}
    assert "1 prompt(s) with invalid UTF-8 (replaced by U+FFFD), 1 cut to 2048 bytes" in caplog.text
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b'{"tag": "single_object", "prompt": "a \xff dog"}\n'
                      + json.dumps({"prompt": "y \ud800"}).encode() + b"\n")
    assert load_prompts(str(jsonl), max_caption_bytes=10) == [{"tag": "single_object", "prompt": "a \ufffd dog"},
                                                              {"prompt": "y \ufffd"}]
    jsonl.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(EvalError, match=rf"^--prompts: {jsonl} line 2 is not a JSON object"):
        load_prompts(str(jsonl))
    for name in ("missing.txt", "missing.jsonl"):
        with pytest.raises(EvalError) as e:
            load_prompts(str(tmp_path / name))
        assert str(e.value) == f"--prompts: prompt file not found: {tmp_path / name}"


def test_prompts_from_shards_replace_invalid_utf8_and_refuse_damaged_shards(tmp_path):
    members = sample_members("a") + [("b.png", png_bytes((1, 2, 3))), ("b.txt", b"bad \xc3( byte")]
    members += sample_members("c") + sample_members("d")
    shard = write_tar(tmp_path / "p-000000.tar", members)
    assert [e["prompt"] for e in load_prompts(str(shard))] == ["a photo of a red square", "bad \ufffd( byte",
                                                              "a photo of a red square", "a photo of a red square"]
    cut(shard, member_offsets(shard)["c.txt"][1] + 5)
    with pytest.raises(EvalError, match=rf"^--prompts: shard {shard} could not be read past sample 2"):
        load_prompts(str(shard))
    with pytest.raises(EvalError, match=r"^--prompts: unbalanced braces"):
        load_prompts(str(tmp_path / "p-{0..1.tar"))


def test_sample_cli_reports_a_missing_prompt_file_in_one_line(tmp_path):
    proc = run_t2i("sample", "--ckpt", tmp_path / "nothing", "--prompts", tmp_path / "missing.txt",
                   "--out", tmp_path / "out", check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"t2i sample: EvalError: --prompts: prompt file not found: {tmp_path / 'missing.txt'}"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Images: the pixel cap (header only) and PIL's decompression-bomb guard
# ---------------------------------------------------------------------------------------------


def test_images_over_the_pixel_cap_are_bad_and_never_decoded(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    raw = {"__key__": "k", "png": png_bytes((1, 2, 3), size=16), "txt": b"a caption"}
    assert decode_sample(raw, 8, random.Random(0), max_pixels=255) == (None, "image")
    assert loads == []                                     # refused from the header: no pixel decoded
    sample, reason = decode_sample(raw, 8, random.Random(0), max_pixels=256)
    assert reason is None and sample["image"].shape == (3, 8, 8) and set(loads) == {(16, 16)}


@pytest.mark.parametrize("limit,filter_", [(100, "default"), (200, "error"), (200, "ignore")])
def test_pil_decompression_bomb_error_and_warning_are_counted_bad_images(tmp_path, monkeypatch, limit, filter_):
    """16x16 = 256 pixels: over 2 x 100 PIL raises DecompressionBombError; over 200 it warns (an error
    under -W error). Both end as one counted bad image, whatever the warning filter."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    members = [("big.png", png_bytes((1, 2, 3), size=16)), ("big.txt", b"a big one")]
    members += [("small.png", png_bytes((1, 2, 3), size=8)), ("small.txt", b"a small one")]
    shard = str(write_tar(tmp_path / "b.tar", members))
    with warnings.catch_warnings():
        warnings.simplefilter(filter_)
        samples = list(itertools.islice(slot_stream([shard], cfg_for(shard), 0, 0, 1), 2))
    assert [s["key"] for s in samples] == ["small", "small"]   # epoch 0, epoch 1
    assert samples[1]["counts"]["image"] == 2 and samples[1]["counts"]["good"] == 2


# ---------------------------------------------------------------------------------------------
# Damaged tars: each counted once, the silent cut detected
# ---------------------------------------------------------------------------------------------


def test_a_tar_cut_inside_a_member_counts_once_per_epoch_as_read(tmp_path, caplog):
    a = shard_of(tmp_path / "a.tar", [f"a{i}" for i in range(6)])
    cut(a, member_offsets(a)["a3.png"][1] + 40)                 # inside a3.png's data
    b = shard_of(tmp_path / "b.tar", ["b0", "b1", "b2"])
    stream = slot_stream([a, b], cfg_for([a, b]), seed=0, slot=0, n_slots=1)
    with caplog.at_level(logging.WARNING):
        epoch0 = list(itertools.takewhile(lambda s: s["pos"][0] == 0, stream))
    assert sorted(s["key"] for s in epoch0) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    counts = first_of_epoch(stream, 2)["counts"]                # two whole epochs read
    assert {k: counts[k] for k in ("read", "short_shard", "image", "caption")} == \
        {"read": 2, "short_shard": 0, "image": 0, "caption": 0}  # (webdataset's reader: read=4)
    assert f"shard {a} could not be read past sample 3: ReadError: unexpected end of data" in caplog.text


def test_a_tar_cut_inside_the_last_member_drops_the_incomplete_sample(tmp_path):
    a = shard_of(tmp_path / "a.tar", [f"a{i}" for i in range(4)])
    cut(a, member_offsets(a)["a3.json"][1] + 5)                 # a3 has png + txt, its json is cut
    counts = {}
    assert [s["__key__"] for s in raw_samples([a], counts)] == ["a0", "a1", "a2"]
    assert counts == {"read": 1}


@pytest.mark.parametrize("with_manifest", [False, True])
def test_a_tar_cut_at_a_header_boundary_is_reported_as_a_short_shard(tmp_path, caplog, with_manifest):
    out = tmp_path / "shards"
    paths = write_shapes_shards(out, 12, samples_per_shard=6, size=32, progress=False)
    if not with_manifest:
        (out / "manifest.json").unlink()
    cut(paths[0], member_offsets(paths[0])["00000004.txt"][0])  # exactly at a header: tarfile stops silently
    with caplog.at_level(logging.WARNING):
        stream = slot_stream(paths, cfg_for(paths), seed=0, slot=0, n_slots=1)
        epoch0 = [s["key"] for s in itertools.takewhile(lambda s: s["pos"][0] == 0, stream)]
        counts = first_of_epoch(stream, 2)["counts"]
    # 00000004 (png only: its txt and json are cut off) is dropped, not decoded into a bad caption
    assert sorted(epoch0) == [f"{i:08d}" for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11)]
    assert {k: counts[k] for k in ("short_shard", "read", "caption", "image")} == \
        {"short_shard": 2, "read": 0, "caption": 0, "image": 0}
    of = " of the 6 its manifest.json lists" if with_manifest else ""
    assert (f"shard {paths[0]} ends without the tar end-of-archive marker (cut short?) after 4 complete "
            f"samples{of}; the last, possibly incomplete, sample is dropped") in caplog.text


def test_a_valid_tar_with_fewer_samples_than_its_manifest_is_a_short_shard(tmp_path, caplog):
    out = tmp_path / "shards"
    paths = write_shapes_shards(out, 8, samples_per_shard=4, size=32, progress=False)
    assert manifest_counts(paths) == {paths[0]: 4, paths[1]: 4}
    with tarfile.open(paths[1]) as tar:  # rewritten with its first two samples only (ends properly)
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()][:6]
    write_tar(Path(paths[1]), members)
    items = list(read_shards(paths, manifest_counts(paths)))
    assert [i.get("__key__") for i in items[:-1]] == [f"{k:08d}" for k in range(6)]
    assert items[-1] == {"__event__": "short_shard", "__url__": paths[1],
                         "__detail__": f"shard {paths[1]} ended after 2 samples, but manifest.json lists 4 for "
                                       f"it (rewritten, or a stale manifest?)"}
    with caplog.at_level(logging.WARNING):
        stream = slot_stream(paths, cfg_for(paths), 0, 0, 1)
        assert first_of_epoch(stream, 1)["counts"]["short_shard"] == 1
    assert "counted as bad 'short_shard' by slot 0/1" in caplog.text


def test_a_manifest_of_another_tool_is_ignored_with_a_warning(make_shards, tmp_path, caplog):
    urls = make_shards(n_shards=1, per_shard=2)
    (tmp_path / "manifest.json").write_text('{"files": ["x"]}')
    with caplog.at_level(logging.WARNING):
        assert manifest_counts(urls) == {}
    assert "is not a t2i make-shards manifest (KeyError: 'shards')" in caplog.text


def test_a_failing_pipe_command_counts_once(make_shards):
    urls = make_shards(n_shards=1, per_shard=3)
    counts = {}
    assert [s["__key__"] for s in raw_samples(["pipe:cat /nonexistent/x.tar", *urls], counts)] == \
        ["s0_000", "s0_001", "s0_002"]
    assert counts == {"read": 1}


def test_a_damaged_shard_read_by_several_slots_counts_once_in_all(tmp_path):
    a = shard_of(tmp_path / "a.tar", [f"a{i}" for i in range(7)])
    cut(a, member_offsets(a)["a5.txt"][1] + 3)
    cfg = cfg_for(a)
    slots = [slot_stream([a], cfg, seed=0, slot=s, n_slots=2) for s in range(2)]
    counts = [first_of_epoch(stream, 3)["counts"] for stream in slots]
    assert [c["read"] for c in counts] == [0, 3]                # 3 epochs, counted by the owner of index 5
    assert [c["good"] for c in counts] == [3 * 3 + 1, 2 * 3 + 1]  # a0..a4 shared 3 / 2 per epoch, + this one


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_over_damaged_shards_keeps_keys_and_counts(tmp_path, num_workers):
    urls = [shard_of(tmp_path / f"s{i}.tar", [f"s{i}_{k}" for k in range(8)]) for i in range(4)]
    cut(urls[1], member_offsets(urls[1])["s1_4.png"][1] + 10)   # read
    cut(urls[2], member_offsets(urls[2])["s2_5.png"][0])        # short_shard
    cfg = cfg_for(urls, num_workers=num_workers, shuffle_buffer=4)
    straight = TrainLoader(cfg, seed=5, rank=0, world_size=1, batch_size=3)
    expected = [next(straight)["keys"] for _ in range(14)]
    first = TrainLoader(cfg, seed=5, rank=0, world_size=1, batch_size=3)
    got = [next(first)["keys"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    state["workers"] = {int(k): v for k, v in state["workers"].items()}
    resumed = TrainLoader(cfg, seed=5, rank=0, world_size=1, batch_size=3, state=state)
    got += [next(resumed)["keys"] for _ in range(9)]
    assert got == expected
    assert resumed.counts() == straight.counts()
    assert straight.counts()["read"] >= 1 and straight.counts()["short_shard"] >= 1


def test_a_checkpoint_whose_counts_lack_the_new_keys_resumes(make_shards):
    urls = make_shards(n_shards=2, per_shard=6)
    cfg = cfg_for(urls, shuffle_buffer=4)
    straight = TrainLoader(cfg, seed=1, rank=0, world_size=1, batch_size=2)
    expected = [next(straight)["keys"] for _ in range(8)]
    first = TrainLoader(cfg, seed=1, rank=0, world_size=1, batch_size=2)
    got = [next(first)["keys"] for _ in range(3)]
    state = first.state_dict()
    old_keys = ("image", "caption", "read", "cache", "good")      # the counts of a pre-issue-11 checkpoint
    for w in state["workers"].values():
        w["counts"] = {k: w["counts"][k] for k in old_keys}
    resumed = TrainLoader(cfg, seed=1, rank=0, world_size=1, batch_size=2, state=state)
    got += [next(resumed)["keys"] for _ in range(5)]
    assert got == expected
    assert resumed.counts() == straight.counts() and set(resumed.counts()) == set(COUNT_KEYS)


# ---------------------------------------------------------------------------------------------
# make-shards: temporary names, manifest counts, refusing to mix
# ---------------------------------------------------------------------------------------------


def _complete_samples(path) -> int:
    with tarfile.open(path) as tar:  # raises on a partial tar
        return len({m.name.split(".")[0] for m in tar.getmembers()})


def test_make_shards_never_shows_a_partial_shard_under_its_name(tmp_path, monkeypatch):
    import t2i.data.writers as writers
    out = tmp_path / "out"
    seen = []
    real_write = writers._Shards.write

    def write_and_look(self, sample):
        real_write(self, sample)
        names = sorted(p.name for p in out.iterdir())
        seen.append(names)
        assert all(_complete_samples(out / n) == 3 for n in names if n.endswith(".tar"))  # only whole shards
        assert sum(n.endswith(".tar.partial") for n in names) == 1 and "manifest.json" not in names

    monkeypatch.setattr(writers._Shards, "write", write_and_look)
    paths = write_shapes_shards(out, 7, samples_per_shard=3, size=32, progress=False)
    assert seen[0] == [".shapes-000000.tar.partial"] and seen[3] == [".shapes-000001.tar.partial", "shapes-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shapes-000000.tar", "shapes-000001.tar",
                                                     "shapes-000002.tar"]
    assert [_complete_samples(p) for p in paths] == [3, 3, 1]
    assert json.loads((out / "manifest.json").read_text())["shards"] == [
        {"name": "shapes-000000.tar", "samples": 3}, {"name": "shapes-000001.tar", "samples": 3},
        {"name": "shapes-000002.tar", "samples": 1}]


def test_a_failed_make_shards_run_publishes_only_whole_shards(tmp_path, monkeypatch):
    import t2i.data.writers as writers
    real = writers.iter_samples

    def failing(n, seed, size):
        for i, s in enumerate(real(n, seed, size)):
            if i == 5:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the second shard
            yield s
    monkeypatch.setattr(writers, "iter_samples", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shapes_shards(out, 9, samples_per_shard=3, size=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shapes-000000.tar"]   # no partial, no manifest
    monkeypatch.setattr(writers, "iter_samples", real)
    with pytest.raises(DataError, match=r"already holds 1 shard\(s\) \(shapes-000000.tar, \.\.\.\) \(and no "
                                        r"manifest.json: an earlier run may have been killed\); pass --overwrite"):
        write_shapes_shards(out, 9, samples_per_shard=3, size=32, progress=False)
    (out / ".shapes-000001.tar.partial").write_bytes(b"left by a kill -9")
    write_shapes_shards(out, 9, samples_per_shard=3, size=32, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shapes-000000.tar", "shapes-000001.tar",
                                                     "shapes-000002.tar"]


@pytest.mark.slow  # a real SIGKILL of a make-shards process (~5 s)
def test_make_shards_killed_with_sigkill_leaves_only_whole_shards(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tools.make_shards", "shapes", "--out", str(out), "--n", "100000",
                             "--per-shard", "20", "--size", "32", "--no-progress"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("*.tar"))) < 2:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 2 and all(_complete_samples(p) == 20 for p in shards)
    assert not (out / "manifest.json").exists()


def test_make_shards_cli_refuses_an_out_with_shards_in_one_line(tmp_path, capsys):
    from t2i.cli import main
    out = tmp_path / "shapes"
    args = ["make-shards", "shapes", "--out", str(out), "--n", "4", "--per-shard", "2", "--size", "32",
            "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"t2i make-shards: DataError: --out {out} already holds 2 shard(s) (shapes-000000.tar, ...); "
                   f"pass --overwrite to replace them (the 'shapes-*.tar' shards and those its manifest.json "
                   f"lists), or choose another --out\n")
    assert main(args + ["--overwrite"]) == 0
    assert main(["make-shards", "folder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(f"--src {tmp_path / 'nope'}: source folder does not exist "
                                            f"(or is not a folder)\n")


def test_folder_captions_with_invalid_utf8_are_replaced_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (4, 4)).save(src / "a.png")
    (src / "a.txt").write_bytes(b"caf\xe9 au lait\n")
    paths = write_folder_shards(src, tmp_path / "out", progress=False)
    with tarfile.open(paths[0]) as tar:
        assert tar.extractfile("a.txt").read().decode() == "caf\ufffd au lait"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["caption_invalid_utf8"] == 1


def test_the_loader_checks_shards_against_the_make_shards_manifest(tmp_path):
    out = tmp_path / "shards"
    paths = write_shapes_shards(out, 10, samples_per_shard=4, size=32, progress=False)
    loader = TrainLoader(cfg_for(str(out)), seed=0, rank=0, world_size=1, batch_size=2)
    assert loader.expected == {paths[0]: 4, paths[1]: 4, paths[2]: 2}
