"""The test suite's time budget, read from a run's JUnit XML: the slowest tests and the total by file.

`make test` and `make test-fast` write `test-results/junit.xml` (pytest's --junitxml); this reads it.

    python -m tools.test_times                          # the last run: 30 slowest tests, files by total
    python -m tools.test_times --top 50 test-results/junit.xml
    python -m tools.test_times --compare before.xml after.xml   # files side by side, with the ratio
    python -m tools.test_times --write-durations tests/durations.json   # record the files' times

`tests/durations.json` (seconds per file) is what tests/conftest.py orders the files by, longest first,
so that `make test`'s parallel workers end together; refresh it after adding or moving slow tests.

A test's time is pytest's (set-up + call + tear-down, so a fixture shows on the first test that builds
it). With parallel workers (pytest-xdist) the tests' times add up to more than the run's wall time:
both are printed, and their ratio is the parallelism the run achieved. The suite's budget is the wall
time (docs/testing.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEFAULT = Path("test-results") / "junit.xml"


@dataclass
class Case:
    file: str
    name: str
    seconds: float
    outcome: str  # passed | failed | error | skipped


@dataclass
class Run:
    cases: list[Case]
    wall: float  # the run's own duration (the <testsuite time=...>), not the sum of the tests


def file_of(classname: str) -> str:
    """`tests.test_ckpt_tools` or `tests.test_x.TestClass` -> `tests/test_ckpt_tools.py`."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        if parts[i - 1].startswith("test_") or parts[i - 1] == "conftest":
            return "/".join(parts[:i]) + ".py"
    return classname.replace(".", "/") + ".py"


def read(path: Path) -> Run:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases, wall = [], 0.0
    for suite in suites:
        wall += float(suite.get("time", 0))
        for tc in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if tc.find(tag) is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
            cases.append(Case(file_of(tc.get("classname", "")), tc.get("name", ""), float(tc.get("time", 0)),
                              outcome))
    return Run(cases, wall)


def by_file(run: Run) -> dict[str, tuple[float, int]]:
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for c in run.cases:
        out[c.file][0] += c.seconds
        out[c.file][1] += 1
    return {f: (s, n) for f, (s, n) in out.items()}


def summary(run: Run) -> str:
    total = sum(c.seconds for c in run.cases)
    counts = defaultdict(int)
    for c in run.cases:
        counts[c.outcome] += 1
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return (f"{len(run.cases)} tests ({outcomes}); wall {run.wall:.0f} s ({run.wall / 60:.1f} min); tests' times "
            f"add up to {total:.0f} s ({total / max(run.wall, 1e-9):.2f}x the wall time)")


def report(run: Run, top: int) -> str:
    lines = [summary(run), "", f"{top} slowest tests", "", "| s | outcome | test |", "|---:|---|---|"]
    for c in sorted(run.cases, key=lambda c: -c.seconds)[:top]:
        lines.append(f"| {c.seconds:.1f} | {c.outcome} | {c.file}::{c.name} |")
    total = sum(c.seconds for c in run.cases) or 1.0
    lines += ["", "Total by file", "", "| s | share | tests | file |", "|---:|---:|---:|---|"]
    for f, (s, n) in sorted(by_file(run).items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {s:.1f} | {100 * s / total:.1f} % | {n} | {f} |")
    return "\n".join(lines)


def compare(before: Run, after: Run, top: int) -> str:
    b, a = by_file(before), by_file(after)
    lines = [f"before: {summary(before)}", f"after:  {summary(after)}", "",
             f"The {top} slowest files before, by the sum of their tests' times", "",
             "| file | before s (tests) | after s (tests) | after / before |", "|---|---:|---:|---:|"]
    for f, (s, n) in sorted(b.items(), key=lambda kv: -kv[1][0])[:top]:
        sa, na = a.get(f, (0.0, 0))
        lines.append(f"| {f} | {s:.0f} ({n}) | {sa:.0f} ({na}) | {sa / s if s else float('nan'):.2f} |")
    lines.append(f"| **whole run, wall** | **{before.wall:.0f}** | **{after.wall:.0f}** | "
                 f"**{after.wall / max(before.wall, 1e-9):.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("xml", nargs="*", type=Path, help=f"JUnit XML file(s) (default: {DEFAULT})")
    p.add_argument("--top", type=int, default=None,
                   help="how many tests to list (default 30), or files with --compare (default 10)")
    p.add_argument("--compare", action="store_true", help="two files: BEFORE AFTER, by file, side by side")
    p.add_argument("--write-durations", type=Path, metavar="JSON",
                   help="write seconds per test file (tests/durations.json, the order tests/conftest.py runs files in)")
    args = p.parse_args(argv)
    files = args.xml or [DEFAULT]
    for f in files:
        if not f.is_file():
            print(f"test_times: {f} not found (make test writes it; or pytest --junitxml={f})", file=sys.stderr)
            return 2
    if args.write_durations:
        times = {f: round(s, 1) for f, (s, _) in sorted(by_file(read(files[0])).items())}
        args.write_durations.write_text(json.dumps(times, indent=1) + "\n")
        print(f"test_times: {len(times)} files' seconds -> {args.write_durations}")
        return 0
    if args.compare:
        if len(files) != 2:
            print("test_times: --compare takes two files, BEFORE AFTER", file=sys.stderr)
            return 2
        print(compare(read(files[0]), read(files[1]), args.top or 10))
    else:
        for f in files:
            print(report(read(f), args.top or 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
