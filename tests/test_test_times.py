"""tools/test_times.py: the suite's slowest tests and seconds by file, from pytest's JUnit XML."""

import json
import subprocess
import sys

from helpers import REPO

from tools import test_times

XML = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" time="{wall}">
<testcase classname="tests.test_a" name="test_one" time="{a1}"/>
<testcase classname="tests.test_a" name="test_two[x]" time="2.0"><skipped message="no"/></testcase>
<testcase classname="tests.test_b" name="test_three" time="{b1}"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def write(path, wall, a1, b1):
    path.write_text(XML.format(wall=wall, a1=a1, b1=b1))
    return path


def test_files_add_up_their_tests_and_compare_side_by_side(tmp_path):
    before = test_times.read(write(tmp_path / "before.xml", 100.0, 10.0, 50.0))
    assert before.wall == 100.0
    assert [(c.file, c.name, c.outcome) for c in before.cases] == [
        ("tests/test_a.py", "test_one", "passed"), ("tests/test_a.py", "test_two[x]", "skipped"),
        ("tests/test_b.py", "test_three", "failed")]
    assert test_times.by_file(before) == {"tests/test_a.py": (12.0, 2), "tests/test_b.py": (50.0, 1)}
    report = test_times.report(before, top=1)
    assert "3 tests (1 failed, 1 passed, 1 skipped); wall 100 s" in report and "0.62x the wall time" in report
    assert "| 50.0 | failed | tests/test_b.py::test_three |" in report and "test_one |" not in report
    after = test_times.read(write(tmp_path / "after.xml", 40.0, 6.0, 25.0))
    table = test_times.compare(before, after, top=10).splitlines()
    assert table[-3:] == ["| tests/test_b.py | 50 (1) | 25 (1) | 0.50 |", "| tests/test_a.py | 12 (2) | 8 (2) | 0.67 |",
                          "| **whole run, wall** | **100** | **40** | **0.40** |"]


def test_write_durations_records_seconds_per_file_for_the_conftest_order(tmp_path):
    xml, out = write(tmp_path / "run.xml", 100.0, 10.0, 50.0), tmp_path / "durations.json"
    proc = subprocess.run([sys.executable, "-m", "tools.test_times", str(xml), "--write-durations", str(out)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert "2 files' seconds" in proc.stdout
    assert json.loads(out.read_text()) == {"tests/test_a.py": 12.0, "tests/test_b.py": 50.0}
    missing = subprocess.run([sys.executable, "-m", "tools.test_times", str(tmp_path / "none.xml")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
