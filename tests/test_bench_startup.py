"""tools/bench_startup.py: the table's medians, ranges and ratios (the timing itself is the benchmark's job)."""

from tools.bench_startup import table


def test_the_table_gives_medians_ranges_and_the_ratio_of_medians():
    rows = [{"case": "plan", "t2i": [2.0, 1.0, 3.0], "baseline": [8.0, 6.0, 10.0]},
            {"case": "train", "t2i": [15.0], "baseline": None}]
    lines = table(rows).splitlines()
    assert lines[2] == "| plan | 2.00 (1.00-3.00) | 8.00 (6.00-10.00) | 0.25 |"
    assert lines[3] == "| train | 15.00 (15.00-15.00) | - | - |"
