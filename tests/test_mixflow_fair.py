"""The fair MixFlow driver's decisions: the pre-registered cut order of cells, the convergence rule, and the
mechanical verdicts (the full run is `python -m tools.mixflow_fair`; `SMOKE=1 bash tools/mixflow_fair_gpu.sh`
runs every stage on a tiny model in minutes)."""

import pytest

from tools.mixflow_fair import cells, converged, fit_budget, nfe
from tools.mixflow_fair_report import verdicts


class Args:
    steps = [2, 4, 8, 16, 32]
    guidance = None


def test_cells_are_steps_times_cfg_one_and_the_trained_scale():
    got = cells(Args, 3.0)
    assert got == [(n, 1.0) for n in Args.steps] + [(n, 3.0) for n in Args.steps]
    assert nfe((8, 1.0)) == 8 and nfe((8, 3.0)) == 16  # CFG evaluates the model twice


def test_budget_cuts_cfg_one_first_then_the_dearest_step_counts_never_more_than_needed():
    all_cells = cells(Args, 3.0)
    per = 1.0 / (2000 * 13)  # one second per NFE per image over all models and images
    kept, dropped = fit_budget(all_cells, per, 2000, 13, budget_s=1e9)
    assert kept == all_cells and dropped == []
    full_cfg = sum(nfe(c) for c in all_cells if c[1] == 3.0)         # 124
    kept, dropped = fit_budget(all_cells, per, 2000, 13, budget_s=full_cfg)
    assert dropped == [(n, 1.0) for n in Args.steps] and kept == [(n, 3.0) for n in Args.steps]
    kept, dropped = fit_budget(all_cells, per, 2000, 13, budget_s=2 * (2 + 4 + 8))
    assert kept == [(2, 3.0), (4, 3.0), (8, 3.0)] and dropped[-2:] == [(32, 3.0), (16, 3.0)]
    # The primary family is cut last, N = 2 at the trained scale never: there is always a result.
    kept, dropped = fit_budget(all_cells, per, 2000, 13, budget_s=0)
    assert kept == [(2, 3.0)] and dropped[-1] == (4, 3.0)


def test_the_slow_flow_job_of_a_scale_is_budgeted_while_a_cell_at_that_scale_is_kept():
    all_cells = [(2, 1.0), (2, 3.0)]
    per = 1.0 / (100 * 13)
    slow = {1.0: 300, 3.0: 600}   # NFE per model: in units of 100 images, 3 and 6 "images" of budget
    assert fit_budget(all_cells, per, 100, 13, budget_s=2 + 4 + 3 + 6, slowflow_nfe=slow)[1] == []
    kept, dropped = fit_budget(all_cells, per, 100, 13, budget_s=2 + 4 + 3 + 5.9, slowflow_nfe=slow)
    assert kept == [(2, 3.0)] and dropped == [(2, 1.0)]   # dropping CFG 1 also drops its Slow Flow job


def test_convergence_compares_the_last_checkpoint_with_the_one_at_80_percent():
    curve = {100 * k: 1.0 / k for k in range(1, 11)}        # 1/k: 0.125 at 800, 0.1 at 1000
    ok, change = converged(curve, 0.01)
    assert not ok and change == pytest.approx(0.25)
    flat = {**curve, 800: 0.1009}
    assert converged(flat, 0.01) == (True, pytest.approx(0.009))


def test_verdicts_need_holm_significance_and_the_same_sign_in_every_seed():
    base = {"converged": True, "change_last_20pct": 0.004}
    test = {"a_only": 40, "b_only": 90, "p": 1e-5, "p_holm": 6e-5, "diff_per_seed": [0.02, 0.03, 0.01]}
    results = {"converged_tol": 0.01, "base": base,
               "cells_table": {"N4-g3": {"tests": {"mixflow-g0.8 vs control": test,
                                                   "mixflow-g0.8 vs gamma0": {**test, "p": 0.2}}}}}
    lines = verdicts(results)
    assert lines[0].endswith("yes (0.40%)")
    assert "C1 MixFlow beats control at few steps (Holm p < 0.05, same sign in every seed): " \
           "mixflow-g0.8 vs control at N4-g3" in lines
    assert lines[-1].endswith(": no")  # C2: not significant against gamma0
    test["diff_per_seed"] = [0.02, -0.01, 0.03]                  # one seed disagrees: not counted
    assert "C1 MixFlow beats control at few steps (Holm p < 0.05, same sign in every seed): no" in verdicts(results)


@pytest.mark.parametrize("schedule, expect_steps, expect_runs", [
    ("constant", [1000, 1200, 1500], 3),   # +25 % (to whole checkpoints) until flat, up to --max-base-steps
    ("cosine", [1000], 1),                 # a decayed schedule has a fixed length: measured once, not extended
])
def test_the_base_is_extended_only_on_a_constant_learning_rate(monkeypatch, tmp_path, schedule, expect_steps,
                                                              expect_runs):
    import tools.mixflow_fair as fair

    asked = []
    monkeypatch.setattr(fair, "train", lambda args, run, steps, overrides: asked.append((steps, overrides)) or 1.0)

    def curve(run, val, device):  # the loss keeps falling 5 % per 10 % of steps: never converged by the 1 % rule
        last = asked[-1][0]
        return {s: 0.95 ** (s // 100) for s in range(last // 10, last + 1, last // 10)}

    monkeypatch.setattr(fair, "ema_validation", curve)
    args = fair.parse(["--base-steps", "1000", "--max-base-steps", "1500", "--base-schedule", schedule])
    results = {"time_s": {}}
    fair.train_base(tmp_path, args, {"train": "t", "val": "v"}, results)
    assert [s for s, _ in asked] == expect_steps and len(asked) == expect_runs
    assert f"train.schedule={schedule}" in asked[0][1] and "train.min_lr_ratio=0.1" in asked[0][1]
    assert results["base"]["steps"] == expect_steps[-1] and results["base"]["converged"] is False
    assert results["base"]["schedule"] == schedule
    # a rerun finds the base trained (train returns 0 s): its time is kept, the validation time only grows
    monkeypatch.setattr(fair, "train", lambda args, run, steps, overrides: 0.0)
    before = dict(results["time_s"])
    fair.train_base(tmp_path, args, {"train": "t", "val": "v"}, results)
    assert results["time_s"]["base"] == before["base"] and results["time_s"]["base_eval"] >= before["base_eval"]


# ------------------------------------------------------------------ amendment 4: auto-γ


def write_base_lag(out, excess):
    """eval/base/auto-gamma.json as derive_auto_gamma writes it: the base's Slow Flow v2 at N = 2 and 4."""
    import json

    path = out / "eval" / "base" / "auto-gamma.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"summaries": {
        "2": {"sigma": [1.0, 0.5, 0.0], "mean_excess": [0.0, excess * 0.5, 0.0]},
        "4": {"sigma": [1.0, 0.75, 0.5, 0.25, 0.0], "mean_excess": [0.0, excess * 0.25, excess * 0.5, excess * 0.75, 0.0]},
    }, "guidance": 3.0, "images": 64}))


@pytest.mark.parametrize("excess, gamma", [(0.1, 0.2), (-0.1, None)])   # λ = excess everywhere; γ = 2λ
def test_auto_gamma_adds_a_fifth_arm_only_when_the_base_lags_in_a_stable_band(monkeypatch, tmp_path, excess, gamma):
    import tools.mixflow_fair as fair
    from tools.mixflow_fair_report import AUTO_ARM, arms_of

    write_base_lag(tmp_path, excess)
    args = fair.parse(["--out", str(tmp_path), "--auto-gamma", "--seeds", "2"])
    results = {"time_s": {}, "base": {"steps": 1000}}
    fair.derive_auto_gamma(tmp_path, args, {}, tmp_path / "base", results)
    assert results["auto_gamma"]["gamma"] == (None if gamma is None else pytest.approx(gamma))
    asked = []
    monkeypatch.setattr(fair, "train", lambda args, run, steps, overrides: asked.append((run.name, overrides)) or 1.0)
    runs = fair.train_arms(tmp_path, args, {"train": "t", "val": "v"}, tmp_path / "base", results)
    expected = {"control", "gamma0", "mixflow-g0.8", "mixflow-g0.4"} | ({AUTO_ARM} if gamma else set())
    assert set(arms_of(results)) == expected and len(runs) == 2 * len(expected)
    if gamma:
        auto = dict(asked)[f"{AUTO_ARM}-s1"]
        assert "train.mixflow_gamma=0.2" in auto and "train.objective=mixflow" in auto and "run.seed=1" in auto


def test_an_arm_added_to_a_finished_plan_is_evaluated_in_its_cells_without_recutting(monkeypatch, tmp_path):
    import json

    import tools.mixflow_fair as fair

    plan = {"models": {"base": "b", "control-s0": "c"}, "cells": [[2, 3.0]], "dropped": [[4, 3.0]],
            "slowflow_images": 16, "jobs": []}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "plan.json").write_text(json.dumps(plan))

    class Done:
        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(fair.subprocess, "Popen", lambda *a, **k: Done())
    monkeypatch.setattr(fair, "analyse", lambda *a: None)
    args = fair.parse(["--out", str(tmp_path)])
    models = {"base": tmp_path / "b", "control-s0": tmp_path / "c", "mixflow-auto-s0": tmp_path / "m"}
    results = {"time_s": {}}
    fair.evaluate(tmp_path, args, {}, models, results)
    got = json.loads((tmp_path / "eval" / "plan.json").read_text())
    assert got["models"]["mixflow-auto-s0"] == str(tmp_path / "m") and got["cells"] == [[2, 3.0]]
    assert got["jobs"] == [["mixflow-auto-s0", [2, 3.0]], ["mixflow-auto-s0", ["slowflow", 3.0]]]
    assert results["dropped_cells"] == [[4, 3.0]]


def test_the_auto_arm_is_judged_on_its_own_line_outside_c1_and_c2():
    test = {"a_only": 40, "b_only": 90, "p": 1e-5, "diff_per_seed": [0.02, 0.03, 0.01]}
    results = {"converged_tol": 0.01, "auto_gamma": {"gamma": 0.3, "reason": "stable band"},
               "cells_table": {"N4-g3": {"tests": {"mixflow-auto vs control": test,
                                                   "mixflow-auto vs gamma0": {**test, "a_only": 90, "b_only": 40}}}}}
    lines = verdicts(results)
    assert "C1 MixFlow beats control at few steps (Holm p < 0.05, same sign in every seed): no" in lines
    assert "C2 MixFlow beats the gamma0 arm (unadjusted p < 0.05): no" in lines
    assert lines[-1] == ("C4 mixflow-auto (unadjusted p < 0.05, same sign in every seed): beats control at N4-g3; "
                         "loses to gamma0 at N4-g3")
    results["auto_gamma"] = {"gamma": None, "reason": "no lag"}
    assert verdicts(results)[-1] == "C4 (exploratory) auto-γ: no lag; no fifth arm"
