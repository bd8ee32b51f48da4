"""Issue 11, evaluation: every bad input is a clear error (or, when allowed, skipped and counted), and no
result file is ever torn. GenEval tags and images, FID reference provenance and resolution, atomic writes
of every report, Slow Flow's --prompts."""

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from t2i.cli import main as cli_main
from t2i.errors import EvalError
from t2i.eval import fid, geneval, geneval_folder
from t2i.eval.features import build_extractor
from t2i.eval.image_source import ImageSource

VALID = "single_object, two_object, counting, colors, position, color_attr"


# ---------------------------------------------------------------- helpers


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with (almost) no pixel data: only the header may be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) \
        + png_chunk(b"IEND", b"")


def corrupt_data_png(size: int = 64) -> bytes:
    """Valid chunks and CRCs (so the header check and verify() pass) around pixel data that does not inflate."""
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 200) \
        + png_chunk(b"IEND", b"")


def shapes_folder(root: Path, n_prompts: int = 6, tags=None, size: int = 64) -> list[dict]:
    """A GenEval-layout folder of the shapes domain: per prompt its ground-truth image (always correct) and
    a blank one (always wrong). `tags` overrides the prompts' tags (e.g. a misspelled one)."""
    from t2i.data.shapes import make_sample

    metas = []
    for p in range(n_prompts):
        image, caption, meta = make_sample(p, seed=3, size=size)
        entry = {k: meta[k] for k in ("tag", "include", "exclude") if k != "exclude" or meta[k]} | {"prompt": caption}
        if tags and p in tags:
            entry["tag"] = tags[p]
        metas.append(entry)
        d = root / f"{p:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        image.save(d / "samples" / "0000.png")
        Image.new("RGB", (size, size), (215, 215, 215)).save(d / "samples" / "0001.png")
    return metas


def score(folder, **kw):
    return geneval_folder.score(folder, progress=False, **kw)


# ---------------------------------------------------------------- GenEval: tags


def test_a_misspelled_tag_is_refused_naming_it_the_closest_and_the_valid_tags(tmp_path, capsys):
    shapes_folder(tmp_path / "s", tags={2: "couting", 4: "couting", 5: "colour"})
    with pytest.raises(EvalError) as e:
        score(tmp_path / "s")
    msg = str(e.value)
    assert "'couting' (2 prompt(s), first 00002/metadata.jsonl; did you mean 'counting'?)" in msg
    assert "'colour' (1 prompt(s), first 00005/metadata.jsonl; did you mean 'colors'?)" in msg
    assert f"the valid tags are {VALID}" in msg and "--custom-tags" in msg
    assert not (tmp_path / "s" / "geneval").exists()                      # refused before anything is written
    rc = cli_main(["geneval", str(tmp_path / "s")])                        # the command: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("t2i geneval: EvalError: unknown GenEval tag(s): 'colour'")


def test_a_prompt_without_a_tag_is_refused(tmp_path):
    shapes_folder(tmp_path / "s", n_prompts=2)
    meta = tmp_path / "s" / "00001" / "metadata.jsonl"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "tag"}) + "\n")
    with pytest.raises(EvalError, match=r"1 prompt\(s\) have no GenEval tag \(first: 00001/metadata.jsonl"):
        score(tmp_path / "s", custom_tags=True)


def test_custom_tags_are_scored_separately_and_never_averaged_into_overall(tmp_path):
    # prompts 0-3 official (each: one correct, one blank image -> 0.5 per tag); 4 and 5 tagged "mine", and
    # their blank images are replaced by correct ones, so the custom tag scores 1.0: were it averaged in,
    # overall would move above 0.5.
    metas = shapes_folder(tmp_path / "s", tags={4: "mine", 5: "mine"})
    for p in (4, 5):
        d = tmp_path / "s" / f"{p:05d}" / "samples"
        (d / "0001.png").write_bytes((d / "0000.png").read_bytes())
    summary = score(tmp_path / "s", custom_tags=True)
    official_tags = {m["tag"] for m in metas[:4]}
    assert set(summary["tags"]) == official_tags and "mine" not in summary["tags"]
    assert summary["overall"] == pytest.approx(0.5)
    assert summary["images"] == 8 and summary["prompts"] == 4 and summary["correct_images"] == pytest.approx(0.5)
    custom = summary["custom_tags"]
    assert custom["tags"] == {"mine": {"score": 1.0, "correct": 4, "images": 4}}
    assert custom["images"] == 4 and custom["prompts"] == 2 and "never part of the overall" in custom["note"]
    out = tmp_path / "s" / "geneval"
    official = [json.loads(line) for line in open(out / "results.jsonl")]
    mine = [json.loads(line) for line in open(out / "custom_results.jsonl")]
    assert len(official) == 8 and {r["tag"] for r in official} == official_tags      # summary_scores.py-safe
    assert len(mine) == 4 and {r["tag"] for r in mine} == {"mine"} and all(r["correct"] for r in mine)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["overall"] == pytest.approx(0.5) and on_disk["custom_tags"]["tags"]["mine"]["score"] == 1.0
    md = (out / "summary.md").read_text()
    assert "| **overall (mean of tags)** | **0.5000** |" in md
    assert "Custom tags (not GenEval tags; NOT part of the overall score)" in md and "| mine | 1.0000 | 4 / 4 |" in md
    # A later run without custom tags does not leave the old custom results behind.
    for p in (4, 5):
        meta = tmp_path / "s" / f"{p:05d}" / "metadata.jsonl"
        meta.write_text(json.dumps(metas[p] | {"tag": "colors"}) + "\n")
    assert score(tmp_path / "s")["custom_tags"] == {}
    assert not (out / "custom_results.jsonl").exists()


def test_a_custom_tag_is_judged_only_when_allowed_and_never_with_the_counting_threshold():
    det = geneval.Detection(0, 0.5, (0, 0, 10, 10))
    meta = {"tag": "couting", "prompt": "two persons", "include": [{"class": "person", "count": 1}]}
    image = Image.new("RGB", (16, 16))
    with pytest.raises(EvalError, match="unknown GenEval tag"):
        geneval.evaluate_image(image, [det], meta, ["person"])
    record = geneval.evaluate_image(image, [det], meta, ["person"], custom_tags=True)
    assert record["correct"] is True                      # 0.5 > 0.3 (plain threshold), though < 0.9 (counting's)
    counting = geneval.evaluate_image(image, [det], meta | {"tag": "counting"}, ["person"])
    assert counting["correct"] is False
    with pytest.raises(EvalError, match="'couting'"):
        geneval.summarize([record, counting])
    s = geneval.summarize([record, counting], custom_tags=True)
    assert s["overall"] == 0.0 and s["tags"] == {"counting": {"score": 0.0, "correct": 0, "images": 1}}
    assert s["custom_tags"]["tags"] == {"couting": {"score": 1.0, "correct": 1, "images": 1}}
    only_custom = geneval.summarize([record], custom_tags=True)
    assert only_custom["overall"] is None and "**n/a**" in geneval.summary_table(only_custom)


# ---------------------------------------------------------------- GenEval: unreadable and oversized images


def break_images(root: Path) -> dict[str, str]:
    """Four bad images in a shapes folder -> {relative path: expected reason prefix}."""
    s = lambda p, k: root / f"{p:05d}" / "samples" / f"{k:04d}.png"  # noqa: E731
    good = s(0, 0).read_bytes()
    s(0, 0).write_bytes(good[: len(good) // 2])                       # truncated
    s(1, 1).write_text("not an image at all\n")                       # not an image
    s(2, 0).write_bytes(header_only_png(8000, 6000))                  # 48M pixels > the 40M cap
    s(3, 1).write_bytes(header_only_png(20000, 20000))                # over PIL's own bomb limit too
    return {"00000/samples/0000.png": "unreadable", "00001/samples/0001.png": "unreadable",
            "00002/samples/0000.png": "oversized: 8000x6000 = 48000000 pixels, over the 40000000-pixel cap",
            "00003/samples/0001.png": "oversized"}


def test_unreadable_and_oversized_images_are_named_one_per_line_and_refused(tmp_path, capsys):
    shapes_folder(tmp_path / "s")
    expected = break_images(tmp_path / "s")
    with pytest.raises(EvalError) as e:
        score(tmp_path / "s")
    lines = str(e.value).splitlines()
    assert lines[0] == f"4 of 12 images in {tmp_path / 's'} cannot be scored:"
    named = {line.strip().split(": ", 1)[0]: line.strip().split(": ", 1)[1] for line in lines[1:5]}
    assert sorted(named) == sorted(str(tmp_path / "s" / k) for k in expected)
    for rel, reason in expected.items():
        assert named[str(tmp_path / "s" / rel)].startswith(reason)
    assert "pass --allow-incomplete to skip them" in lines[-1]
    assert not (tmp_path / "s" / "geneval").exists()


def test_allow_incomplete_skips_bad_images_counts_them_and_scores_the_rest(tmp_path, capsys):
    shapes_folder(tmp_path / "s")
    expected = break_images(tmp_path / "s")
    summary = score(tmp_path / "s", allow_incomplete=True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("geneval: skipped")]
    assert len(err) == 4 and all(any(rel in line for line in err) for rel in expected)   # one line each
    assert summary["images"] == 8                                      # 12 - 4 skipped
    assert [b["file"] for b in summary["skipped_images"]] == sorted(str(tmp_path / "s" / k) for k in expected)
    assert "4 unreadable or oversized images skipped" in summary["problems"]
    # the survivors: prompt 0 and 2 keep only their blank image (wrong), 1 and 3 only the correct one
    results = {Path(r["filename"]).relative_to(tmp_path / "s").as_posix(): r["correct"]
               for r in map(json.loads, open(tmp_path / "s" / "geneval" / "results.jsonl"))}
    assert len(results) == 8 and not set(results) & set(expected)
    assert [results[f"{p:05d}/samples/{k:04d}.png"] for p, k in [(0, 1), (1, 0), (2, 1), (3, 0), (4, 0), (4, 1)]] \
        == [False, True, False, True, True, False]
    assert "4 unreadable or oversized images skipped" in (tmp_path / "s" / "geneval" / "summary.md").read_text()


def test_the_pixel_cap_is_an_option_and_read_from_the_header(tmp_path, capsys):
    shapes_folder(tmp_path / "s", n_prompts=2)
    rc = cli_main(["geneval", str(tmp_path / "s"), "--max-pixels", str(64 * 64 - 1)])
    err = capsys.readouterr().err
    assert rc == 2 and "t2i geneval: EvalError: 4 of 4 images" in err
    assert "oversized: 64x64 = 4096 pixels, over the 4095-pixel cap (--max-pixels)" in err
    assert cli_main(["geneval", str(tmp_path / "s"), "--max-pixels", str(64 * 64)]) == 0
    assert geneval.check_image(tmp_path / "s" / "00000" / "samples" / "0000.png") is None


def test_an_image_that_passes_the_header_check_but_fails_to_decode_is_caught_while_scoring(tmp_path):
    shapes_folder(tmp_path / "s", n_prompts=2)
    bad = tmp_path / "s" / "00001" / "samples" / "0000.png"
    bad.write_bytes(corrupt_data_png())
    assert geneval.check_image(bad) is None                           # header and CRCs are fine
    with pytest.raises(EvalError, match=r"1 of 4 images .* cannot be scored:\n  .*00001/samples/0000.png: "
                                        r"unreadable"):
        score(tmp_path / "s")
    summary = score(tmp_path / "s", allow_incomplete=True)
    assert summary["images"] == 3 and [b["file"] for b in summary["skipped_images"]] == [str(bad)]


def test_broken_metadata_missing_prompt_files_and_bad_options_are_eval_errors(tmp_path):
    shapes_folder(tmp_path / "s", n_prompts=2)
    with pytest.raises(EvalError, match=r"--prompts: prompt file not found: .*nope.jsonl"):
        score(tmp_path / "s", prompts=str(tmp_path / "nope.jsonl"))
    with pytest.raises(EvalError, match=r"--object-names: file not found"):
        score(tmp_path / "s", object_names=str(tmp_path / "names.txt"))
    with pytest.raises(EvalError, match=r"--options threshold=high: expected threshold=<number>"):
        geneval_folder.parse_options(["threshold=high"])
    (tmp_path / "s" / "00001" / "metadata.jsonl").write_text('{"tag": "colors", "prompt": ')
    with pytest.raises(EvalError, match=r"00001/metadata.jsonl: not valid JSON"):
        score(tmp_path / "s")


# ---------------------------------------------------------------- GenEval: atomic result files


def test_a_scorer_dying_mid_write_leaves_the_old_summary_whole(tmp_path, monkeypatch):
    shapes_folder(tmp_path / "s", n_prompts=3)
    out = tmp_path / "s" / "geneval"
    old = score(tmp_path / "s")
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "summary.json", "summary.md")}

    class Killed(BaseException):
        pass

    real = Path.write_text

    def dies_half_way(self, data, *a, **kw):
        if self.name.startswith(".summary.json."):
            real(self, data[: len(data) // 2], *a, **kw)               # a torn temp file ...
            raise Killed                                               # ... and the process is gone
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(Killed):
        score(tmp_path / "s", options=geneval.Options(max_objects=15))
    monkeypatch.undo()
    assert (out / "summary.json").read_bytes() == before["summary.json"]   # the old summary, whole
    assert json.loads((out / "summary.json").read_text())["options"]["max_objects"] == 16
    assert not list(out.glob(".*.tmp"))                                    # the torn temp file was removed
    new = score(tmp_path / "s", options=geneval.Options(max_objects=15))
    assert json.loads((out / "summary.json").read_text())["options"]["max_objects"] == 15
    assert new["overall"] == old["overall"]


def test_two_scorers_on_one_folder_never_share_a_temp_name(tmp_path, monkeypatch):
    shapes_folder(tmp_path / "s", n_prompts=3)
    out = tmp_path / "s" / "geneval"
    real = Path.write_text
    both_present = []

    def snapshot():  # runs once both scorers have written their temp file of the same target, before either renames
        both_present.append(sorted(p.name for p in out.glob(".*.tmp")))

    barrier = threading.Barrier(2, action=snapshot, timeout=60)

    def write_text(self, data, *a, **kw):
        n = real(self, data, *a, **kw)
        if self.name.endswith(".tmp") and threading.current_thread().name.startswith("scorer"):
            barrier.wait()
        return n

    monkeypatch.setattr(Path, "write_text", write_text)
    summaries, errors = {}, []

    def run(max_objects):
        try:
            summaries[max_objects] = score(tmp_path / "s", options=geneval.Options(max_objects=max_objects))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(m,), name=f"scorer{m}") for m in (16, 15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(summaries) == 2
    assert len(both_present) == 3                        # results.jsonl, summary.json, summary.md
    for names in both_present:                           # two distinct temp files of one target at once
        assert len(names) == 2 and len(set(names)) == 2 and len({n.split(".")[1] for n in names}) == 1
    final = json.loads((out / "summary.json").read_text())
    assert final["options"]["max_objects"] in (15, 16)   # one scorer's summary, whole
    assert final == json.loads(json.dumps(summaries[final["options"]["max_objects"]]))
    assert not list(out.glob(".*.tmp"))


KILL_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
real = Path.write_text
def write_text(self, data, *a, **kw):
    if self.name.startswith(".summary.json."):
        real(self, data[: len(data) // 2], *a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)          # killed while writing the summary
    return real(self, data, *a, **kw)
Path.write_text = write_text
from t2i.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_sigkill_of_t2i_geneval_mid_write_leaves_the_old_summary(tmp_path):
    shapes_folder(tmp_path / "s", n_prompts=3)
    out = tmp_path / "s" / "geneval"
    score(tmp_path / "s")
    before = (out / "summary.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "geneval", str(tmp_path / "s"),
                           "--options", "max_objects=15"], cwd=REPO, env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "summary.json").read_bytes() == before                  # old summary, byte for byte
    torn = list(out.glob(".summary.json.*.tmp"))
    assert len(torn) == 1 and len(torn[0].read_bytes()) < len(before)     # it did die mid-write
    with pytest.raises(json.JSONDecodeError):
        json.loads(torn[0].read_text())
    rerun = subprocess.run([sys.executable, "-m", "t2i.cli", "geneval", str(tmp_path / "s"), "--options",
                            "max_objects=15"], cwd=REPO, env=_env(), capture_output=True, timeout=300)
    assert rerun.returncode == 0
    assert json.loads((out / "summary.json").read_text())["options"]["max_objects"] == 15


@pytest.mark.slow
def test_two_t2i_geneval_processes_on_one_folder_both_finish_with_a_whole_summary(tmp_path):
    shapes_folder(tmp_path / "s", n_prompts=6)
    procs = [subprocess.Popen([sys.executable, "-m", "t2i.cli", "geneval", str(tmp_path / "s"), "--options",
                               f"max_objects={m}"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for m in (16, 15)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    out = tmp_path / "s" / "geneval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["max_objects"] in (15, 16) and summary["overall"] == pytest.approx(0.5)
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------- FID: resolution and provenance


def write_pngs(folder: Path, n: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_fid_score_at_another_resolution_than_the_reference_is_refused_naming_both(tmp_path, capsys):
    real = write_pngs(tmp_path / "real", 8, 32, 0)
    gen = write_pngs(tmp_path / "gen", 8, 32, 1)
    ref = tmp_path / "ref.npz"
    assert cli_main(["fid", "ref", "--folder", str(real), "--resolution", "16", "--out", str(ref),
                     "--no-progress"]) == 0
    capsys.readouterr()
    rc = cli_main(["fid", "score", "--images", str(gen), "--ref", str(ref), "--resolution", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"t2i fid: EvalError: images at 32 px but reference {ref} was made at 16 px")
    assert err[0].endswith("or pass --allow-resolution-mismatch")
    out = tmp_path / "fid.json"
    assert cli_main(["fid", "score", "--images", str(gen), "--ref", str(ref), "--resolution", "32",
                     "--allow-resolution-mismatch", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["resolution"] == 32 and result["reference"]["resolution"] == 16
    assert result["warnings"][0].startswith("resolution mismatch allowed (--allow-resolution-mismatch): images at "
                                            "32 px but reference")
    same = fid.score_folder(gen, ref, progress=False)                  # default: the reference's resolution
    assert same["resolution"] == 16 and not any("mismatch" in w for w in same["warnings"])
    native = tmp_path / "native.npz"
    fid.make_reference(ImageSource(folder=str(real)), build_extractor("random-conv"), native, progress=False)
    with pytest.raises(EvalError, match="images at 16 px but reference .* was made at native size"):
        fid.score_folder(gen, native, resolution=16, progress=False)


def test_the_reference_records_its_provenance_and_compares_sources_by_what_they_resolve_to(tmp_path,
                                                                                          make_shards, monkeypatch):
    urls = make_shards(n_shards=2, per_shard=4)
    monkeypatch.chdir(tmp_path)
    relative = "::".join(os.path.relpath(u, tmp_path) for u in urls)
    ext = build_extractor("random-conv")
    stats = fid.make_reference(ImageSource(shards=relative, resolution=16, max_images=6), ext,
                               tmp_path / "r.npz", progress=False)
    meta = fid.load_reference(tmp_path / "r.npz").meta
    assert meta == stats.meta
    assert {k: meta[k] for k in ("source", "max_images", "resolution", "extractor", "spec")} == {
        "source": f"shards:{relative}", "max_images": 6, "resolution": 16,
        "extractor": "random-conv-v1:seed=0:res=64", "spec": "random-conv"}
    assert meta["source_id"].startswith("shards:2:") and meta["counts"] == {"good": 6, "image": 0, "read": 0}

    def wanted(spec=urls, **kw):
        args = dict(shards=spec, resolution=16, max_images=6) | kw
        return fid.reference_provenance(ImageSource(**args), ext)

    assert fid.reference_differences(meta, wanted()) == []              # absolute spelling: the same shards
    assert fid.reference_differences(meta, wanted(max_images=7)) == ["max images: recorded 6, requested 7"]
    assert fid.reference_differences(meta, wanted(resolution=32)) == ["resolution: recorded 16, requested 32"]
    assert fid.reference_differences(meta, wanted(spec=urls[:1])) == [
        f"source: recorded 'shards:{relative}', requested 'shards:{urls[0]}'"]
    other = fid.reference_provenance(ImageSource(shards=urls, resolution=16, max_images=6),
                                     build_extractor("random-conv:1:64"))
    assert fid.reference_differences(meta, other) == [
        "extractor: recorded 'random-conv-v1:seed=0:res=64', requested 'random-conv-v1:seed=1:res=64'"]


def test_a_reference_write_that_dies_leaves_the_old_reference_and_a_torn_npz_is_an_eval_error(tmp_path,
                                                                                              monkeypatch):
    feats = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    path = tmp_path / "ref.npz"
    fid.save_reference(path, feats, {"extractor": "x", "resolution": 16})
    before = path.read_bytes()
    real = np.savez

    def dies(f, **arrays):
        real(f, **arrays)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies)
    with pytest.raises(KeyboardInterrupt):
        fid.save_reference(path, feats * 2, {"extractor": "x", "resolution": 32})
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    assert fid.load_reference(path).meta["resolution"] == 16
    path.write_bytes(before[:200])
    with pytest.raises(EvalError, match=r"ref.npz is not a readable reference .npz .*rebuild it"):
        fid.load_reference(path)


# ---------------------------------------------------------------- t2i eval: the FID reference, end to end


def eval_args(out, *extra) -> argparse.Namespace:
    from pipelines.evaluate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--ckpt", "a=/fake/run", "--out", str(out), "--per-tag", "1", "--images-per-prompt", "2",
                         *map(str, extra)])


@pytest.fixture
def fake_sampling(monkeypatch):
    """`t2i eval` without a model: load_any returns a stand-in, sampling writes a seeded noise image per item
    at the requested resolution (GenEval layout), so GenEval, FID and the report run for real."""
    from t2i.checkpoint import loading
    from t2i.eval import sample_folder

    def load_any(path, cfg, ema=True, device="cpu", lora=None):
        return SimpleNamespace(cfg=SimpleNamespace(sample=SimpleNamespace(steps=2, guidance=1.0, shift=1.0,
                                                                             guidance_interval=[0.0, 1.0]),
                                                   data=SimpleNamespace(resolution=16)), source=f"{path} (ema)",
                               lora=None)

    def run(loaded, entries, out, *, prompts_source, images_per_prompt, resolution, seed, **kw):
        rng = np.random.default_rng(seed)
        for p, entry in enumerate(entries):
            d = Path(out) / f"{p:05d}"
            (d / "samples").mkdir(parents=True, exist_ok=True)
            (d / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
            for k in range(images_per_prompt):
                Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
                    d / "samples" / f"{k:04d}.png")
        return {"images": len(entries) * images_per_prompt, "skipped": 0, "seconds": 1.0, "images_per_s": 1.0}

    monkeypatch.setattr(loading, "load_any", load_any)
    monkeypatch.setattr(sample_folder, "run", run)


def test_eval_rebuilds_a_stale_default_reference_and_refuses_a_stale_given_one(tmp_path, fake_sampling, capsys):
    from pipelines.evaluate import main

    real = write_pngs(tmp_path / "real", 12, 24, 0)
    out = tmp_path / "eval"
    assert main(eval_args(out, "--fid-shards", real, "--fid-max", 8), None) == 0
    ref = out / "fid_ref.npz"
    first = fid.load_reference(ref).meta
    assert (first["max_images"], first["resolution"], first["n"]) == (8, 16, 8)
    assert first["source"] == f"folder:{real}" and first["extractor"] == "random-conv-v1:seed=0:res=64"
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoints"]["a"]["fid"]["n_reference"] == 8
    assert report["settings"]["fid_reference_meta"]["max_images"] == 8
    for name in ("report.json", "report.md", "grid.png"):
        assert (out / name).stat().st_size > 0
    assert Image.open(out / "grid.png").format == "PNG" and not list(out.glob(".*.tmp*"))
    capsys.readouterr()

    ino = ref.stat().st_ino
    assert main(eval_args(out, "--fid-shards", real, "--fid-max", 8), None) == 0      # same inputs: reused
    assert ref.stat().st_ino == ino and "rebuilding" not in capsys.readouterr().out

    assert main(eval_args(out, "--fid-shards", real, "--fid-max", 10), None) == 0     # --fid-max changed
    assert "[eval] rebuilding" in capsys.readouterr().out and fid.load_reference(ref).meta["n"] == 10
    assert json.loads((out / "report.json").read_text())["checkpoints"]["a"]["fid"]["n_reference"] == 10

    assert main(eval_args(out, "--fid-shards", real, "--fid-max", 10, "--fid-extractor", "random-conv:1:64"),
                None) == 0                                                              # extractor changed
    assert "extractor: recorded 'random-conv-v1:seed=0:res=64'" in capsys.readouterr().out
    assert fid.load_reference(ref).meta["extractor"] == "random-conv-v1:seed=1:res=64"

    assert main(eval_args(out, "--fid-shards", real, "--fid-max", 10, "--resolution", 24), None) == 0
    assert "resolution: recorded 16, requested 24" in capsys.readouterr().out
    assert fid.load_reference(ref).meta["resolution"] == 24

    given = tmp_path / "given.npz"
    given.write_bytes(ref.read_bytes())                                  # 24 px, --fid-max 10, random-conv seed 0
    before = given.read_bytes()
    with pytest.raises(EvalError) as e:
        main(eval_args(out, "--fid-ref", given, "--fid-shards", real, "--fid-max", 4, "--resolution", 24,
                       "--fid-extractor", "random-conv:1:64"), None)
    msg = str(e.value)
    assert msg.startswith(f"--fid-ref {given} was built from other inputs than --fid-shards/--fid-max/")
    assert "max images: recorded 10, requested 4" in msg and "extractor: recorded 'random-conv-v1:seed=0:res=64', " \
        "requested 'random-conv-v1:seed=1:res=64'" in msg and "Pass a new --fid-ref path" in msg
    assert given.read_bytes() == before                                  # a given reference is never overwritten


def test_eval_refuses_a_reference_of_another_resolution_unless_allowed(tmp_path, fake_sampling, capsys):
    from pipelines.evaluate import main

    real = write_pngs(tmp_path / "real", 8, 32, 0)
    ref = tmp_path / "ref32.npz"
    fid.make_reference(ImageSource(folder=str(real), resolution=32), build_extractor("random-conv"), ref,
                       progress=False)
    out = tmp_path / "eval"
    with pytest.raises(EvalError, match=r"images at 16 px but --fid-ref .* was made at 32 px"):
        main(eval_args(out, "--fid-ref", ref, "--resolution", 16), None)   # known before sampling: refused first
    assert not (out / "a").exists()
    with pytest.raises(EvalError, match=rf"images at 16 px but the FID reference {ref} was made at 32 px: .* "
                                        r"or pass --allow-resolution-mismatch"):
        main(eval_args(out, "--fid-ref", ref), None)                        # from the checkpoint: after sampling
    assert main(eval_args(out, "--fid-ref", ref, "--allow-resolution-mismatch"), None) == 0
    fid_result = json.loads((out / "report.json").read_text())["checkpoints"]["a"]["fid"]
    assert fid_result["resolution"] == 32 and fid_result["warnings"][0].startswith("resolution mismatch allowed")
    assert "- a: resolution mismatch allowed" in (out / "report.md").read_text()
    with pytest.raises(EvalError, match="--fid-max only applies when the reference is built from --fid-shards"):
        main(eval_args(out, "--fid-ref", ref, "--fid-max", 3), None)
    with pytest.raises(EvalError, match="reference statistics not found"):
        main(eval_args(out, "--fid-ref", tmp_path / "missing.npz"), None)


def test_eval_refuses_a_misspelled_tag_before_sampling_and_reports_custom_tags_apart(tmp_path, fake_sampling):
    from pipelines.evaluate import main
    from t2i.eval.prompts import shapes_geneval, write_prompts

    entries = shapes_geneval(per_tag=1)
    entries[-1] = entries[-1] | {"tag": "couting"}
    prompts = write_prompts(entries, tmp_path / "p.jsonl")
    out = tmp_path / "eval"
    with pytest.raises(EvalError, match="'couting' .*did you mean 'counting'"):
        main(eval_args(out, "--prompts", prompts), None)
    assert not (out / "a").exists()
    with pytest.raises(EvalError, match=r"--prompts: prompt file not found: .*none.jsonl"):
        main(eval_args(out, "--prompts", tmp_path / "none.jsonl"), None)
    assert main(eval_args(out, "--prompts", prompts, "--custom-tags"), None) == 0
    report = json.loads((out / "report.json").read_text())
    g = report["checkpoints"]["a"]["geneval"]
    assert "couting" not in g["tags"] and set(g["custom_tags"]["tags"]) == {"couting"}
    assert g["overall"] == pytest.approx(np.mean([t["score"] for t in g["tags"].values()]))
    assert "- a: custom tags, NOT in the GenEval score: couting" in (out / "report.md").read_text()


def test_eval_on_untagged_prompts_skips_geneval_says_why_and_reports_fid(tmp_path, fake_sampling, capsys):
    """Issue 14: a .txt prompt list or shard captions (another domain) get FID/KID, not shapes GenEval."""
    from conftest import write_sample_shards
    from pipelines.evaluate import main

    real = write_pngs(tmp_path / "real", 8, 24, 0)
    prompts = tmp_path / "digits.txt"
    prompts.write_text("a handwritten 3\na handwritten 7\n")
    out = tmp_path / "eval"
    assert main(eval_args(out, "--prompts", prompts, "--fid-shards", real), None) == 0
    printed = capsys.readouterr().out
    assert f"[eval] GenEval skipped: the prompts ({prompts}) carry no GenEval tags" in printed
    assert "scoring FID/KID" in printed and "[eval] a: GenEval skipped" in printed
    report = json.loads((out / "report.json").read_text())
    row = report["checkpoints"]["a"]
    assert "geneval" not in row and row["fid"]["n_images"] == 4 and not (out / "a" / "geneval").exists()
    assert report["settings"]["geneval"].startswith("skipped: the prompts") and "detector" not in report["settings"]
    md = (out / "report.md").read_text()
    assert "| checkpoint | FID | KID |" in md and "- GenEval: skipped: the prompts" in md
    # shard captions without GenEval clauses: the same; --no-geneval skips it even for a GenEval set
    shards = write_sample_shards(tmp_path, 1, 3, prefix="caps")
    assert main(eval_args(tmp_path / "e2", "--prompts", shards[0], "--fid-shards", real), None) == 0
    assert "geneval" not in json.loads((tmp_path / "e2" / "report.json").read_text())["checkpoints"]["a"]
    assert main(eval_args(tmp_path / "e3", "--no-geneval", "--fid-shards", real), None) == 0
    report = json.loads((tmp_path / "e3" / "report.json").read_text())
    assert report["settings"]["geneval"] == "skipped: --no-geneval" and report["settings"]["num_prompts"] == 6
    # with nothing else to score it is refused before sampling
    with pytest.raises(EvalError, match=r"^nothing to score: GenEval is skipped \(--no-geneval\) and no "
                                        r"--fid-shards / --fid-ref or --clip is given"):
        main(eval_args(tmp_path / "e4", "--no-geneval"), None)
    assert not (tmp_path / "e4" / "a").exists()


def test_geneval_on_a_folder_sampled_from_a_txt_list_says_what_it_needs(tmp_path, capsys):
    folder = tmp_path / "samples"
    for i, prompt in enumerate(["a cat", "a dog"]):
        (folder / f"{i:05d}" / "samples").mkdir(parents=True)
        (folder / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
        Image.new("RGB", (8, 8)).save(folder / f"{i:05d}" / "samples" / "0000.png")
    assert cli_main(["geneval", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyError" not in err
    assert err.startswith(f"t2i geneval: EvalError: {folder} has no GenEval metadata: its 2 prompt folder(s) carry "
                          f"no \"tag\" (first: 00000/metadata.jsonl, 'a cat')")
    assert "\"tag\" and \"include\"" in err and "t2i geneval-prompts" in err and "evaluation_metadata.jsonl" in err
    # a tagged prompt without its "include" clauses would score every image correct: refused
    (folder / "00000" / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": "a cat"}) + "\n")
    (folder / "00001" / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": "a dog"}) + "\n")
    with pytest.raises(EvalError, match=r"^2 prompt\(s\) have no GenEval \"include\" list \(first: 00000/metadata"):
        geneval_folder.score(folder)


# ---------------------------------------------------------------- atomic report files elsewhere


def test_slowflow_report_files_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    from t2i.eval.slowflow_report import write_report

    results = {"a": {2: {"sigma": [1.0, 0.5, 0.0], "mean_gap": [0.0, 0.1, 0.0], "q10": [0.0, 0.05, 0.0],
                         "q50": [0.0, 0.1, 0.0], "q90": [0.0, 0.2, 0.0], "n_images": 4}}}
    files = write_report(results, tmp_path)
    before = {k: Path(v).read_bytes() for k, v in files.items()}
    assert json.loads(before["json"]) == json.loads(json.dumps(results))
    assert before["png"][:8] == b"\x89PNG\r\n\x1a\n" and "| a | +0.1000 |" in before["md"].decode()
    real = matplotlib.figure.Figure.savefig

    def dies(self, fname, **kw):
        real(self, fname, **kw)
        Path(fname).write_bytes(Path(fname).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies)
    results["a"][2]["mean_gap"] = [0.0, 0.3, 0.0]
    with pytest.raises(KeyboardInterrupt):
        write_report(results, tmp_path)
    assert (tmp_path / "slowflow.png").read_bytes() == before["png"] and not list(tmp_path.glob(".*.tmp"))
    assert "+0.3000" in (tmp_path / "slowflow.md").read_text()          # the files before it: the new ones


def test_slowflow_missing_prompts_file_is_an_eval_error_naming_it(tmp_path, capsys):
    from pipelines.slowflow import main

    missing = tmp_path / "prompts.txt"
    rc = cli_main(["slowflow", "--ckpt", f"a={tmp_path / 'run'}", "--prompts", str(missing), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"t2i slowflow: EvalError: --prompts {missing}: not found (expected a text file, "
                               f"one prompt per line)"]
    with pytest.raises(EvalError, match="is a directory, not a file"):
        main(["--ckpt", "a=x", "--prompts", str(tmp_path), "--out", str(tmp_path / "o")])
    missing.write_text("\n  \n")
    with pytest.raises(EvalError, match="holds no prompt"):
        main(["--ckpt", "a=x", "--prompts", str(missing), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "out").exists()


def test_bench_results_and_loader_shards_are_written_whole(tmp_path, monkeypatch):
    from tools import bench_loader
    from tools.bench import append_result

    results = tmp_path / "results.jsonl"
    append_result(results, {"variant": "a", "images_per_s": 1.0})
    append_result(results, {"variant": "b", "images_per_s": 2.0})
    assert [json.loads(line)["variant"] for line in results.read_text().splitlines()] == ["a", "b"]

    urls = bench_loader.write_synthetic_shards(tmp_path / "syn", n_shards=2, per_shard=3, width=16, height=12)
    stamp = tmp_path / "syn" / "bench-manifest.json"
    assert json.loads(stamp.read_text())["per_shard"] == 3 and not list((tmp_path / "syn").glob(".*.tmp"))
    import tarfile
    assert len(tarfile.open(urls[1]).getnames()) == 6
    ino = Path(urls[0]).stat().st_ino
    assert bench_loader.write_synthetic_shards(tmp_path / "syn", n_shards=2, per_shard=3, width=16,
                                               height=12) == urls
    assert Path(urls[0]).stat().st_ino == ino                              # complete and stamped: reused

    calls = []

    def dies(self, obj):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, obj)

    import webdataset as wds
    real_write = wds.TarWriter.write
    monkeypatch.setattr(wds.TarWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        bench_loader.write_synthetic_shards(tmp_path / "syn", n_shards=2, per_shard=4, width=16, height=12)
    monkeypatch.undo()
    assert not stamp.exists()                                   # no stamp: the next run rewrites the shards
    assert len(tarfile.open(urls[0]).getnames()) == 6           # the old shard, whole; no torn tar in its place
    assert not list((tmp_path / "syn").glob(".*.tmp"))


def test_clipscore_names_bad_images_before_loading_any_model(tmp_path):
    from t2i.eval.clipscore import score_folder

    shapes_folder(tmp_path / "s", n_prompts=2)
    bad = tmp_path / "s" / "00001" / "samples" / "0001.png"
    bad.write_bytes(b"GIF89a not really")
    with pytest.raises(EvalError, match=rf"1 of 4 images in .* cannot be scored:\n  {bad}: unreadable"):
        score_folder(tmp_path / "s", "ViT-B-32", tmp_path / "no-weights.bin")


def test_fid_sources_count_oversized_and_unreadable_images_as_bad_without_decoding_them(tmp_path):
    folder = write_pngs(tmp_path / "imgs", 3, 16, 0)
    (folder / "huge.png").write_bytes(header_only_png(8000, 6000))    # 48M pixels: never decoded
    (folder / "torn.png").write_bytes((folder / "000.png").read_bytes()[:40])
    source = ImageSource(folder=str(folder))
    assert len(list(source)) == 3 and source.counts == {"good": 3, "image": 2, "read": 0}
