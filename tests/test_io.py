"""Atomic writes: a reader sees the old file or the new one, never a torn one; writers never share a
temporary name; a failed write leaves nothing behind."""

import os
import stat
import threading

import pytest

from t2i.io import atomic_write, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "summary.json", "old")

    def torn(tmp):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_concurrent_writers_never_share_a_temporary_name(tmp_path):
    seen, lock = [], threading.Lock()

    def write(i):
        def body(tmp):
            with lock:
                seen.append(tmp.name)
            tmp.write_text(str(i))
        atomic_write(tmp_path / "out.txt", body)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 16 and all(n.startswith(".out.txt.") for n in seen)
    assert (tmp_path / "out.txt").read_text() in {str(i) for i in range(16)}
    assert os.listdir(tmp_path) == ["out.txt"]


def test_results_are_readable_by_others_and_json_ends_with_a_newline(tmp_path):
    path = write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # group/other can read (mkstemp alone gives 0600)
