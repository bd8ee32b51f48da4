"""Where DeepSpeed's optimizer step spends its time: overflow check, gradient norm, the gradients' copy
into the fp32 partition, the update, the copy back into the bf16 weights, the weight all-gather.

DeepSpeed's `engine.step()` is one opaque phase in t2i's timings, and on an H100 it was the largest cost
t2i adds (260-290 ms against 44-56 ms for a fused AdamW step). To see which part costs what, `install`
hooks the ZeRO optimizer instance (never the class):

* its own timer interface: ZeRO-1/2 start/stop `optimizer_gradients` (flatten + cast of the reduced
  gradients into a fresh fp32 partition, unscale and clip), `optimizer_step` (the update and the copy of
  the fp32 partition back into the bf16 weights) and `optimizer_allgather` around their parts of
  `step()`; they are no-ops unless `wall_clock_breakdown` is on. `install` gives the instance a timer
  object that adds into t2i's phases instead (and does not print);
* wrappers around the instance's `check_overflow`, `scaled_global_norm` and `_optimizer_step` methods
  (ZeRO-1/2: deepspeed.runtime.zero.stage_1_and_2), so the overflow check, the norm and the update
  itself are separated from the timers' spans. ZeRO-3 (deepspeed.runtime.zero.stage3) has one method
  per part (`_get_norm_groups`, `_prepare_sub_group`, `_optimizer_step`,
  `_reassign_or_swap_out_partitioned_parameters`, ...), which are wrapped instead.

Phases are named `opt.<part>`; `breakdown` turns them into {part: ms} with `copy_back` = the
`optimizer_step` span minus the update and `other` = the whole step minus the parts. On a GPU each
span synchronises the device (as t2i's phases do), so it is only installed with `logging.phase_times`.
"""

from __future__ import annotations

import functools

from t2i.train.timing import Phases

# Instance methods -> part name. ZeRO-1/2 (DeepSpeedZeroOptimizer); its timers below time the rest.
METHODS = {"check_overflow": "overflow", "scaled_global_norm": "grad_norm", "_optimizer_step": "update"}
# ZeRO-3 (DeepSpeedZeroOptimizer_Stage3) has a method for each part and one timer around all of them.
METHODS_ZERO3 = {"_overflow_check_and_loss_scale_update": "overflow", "_get_norm_groups": "grad_norm",
                 "_prepare_sub_group": "grads_to_fp32", "unscale_and_clip_grads": "grads_to_fp32",
                 "_optimizer_step": "update", "_reassign_or_swap_out_partitioned_parameters": "copy_back"}
# DeepSpeed timer names -> part name.
TIMERS = {"optimizer_gradients": "grads_to_fp32", "optimizer_step": "update_and_copy_back",
          "optimizer_allgather": "allgather"}
PARTS = ("overflow", "grad_norm", "grads_to_fp32", "update", "copy_back", "allgather", "other")


class _Timer:
    """DeepSpeed's timer interface (start/stop/elapsed/reset) adding into a t2i phase."""

    def __init__(self, phases: Phases, name: str):
        self.phases, self.name, self._span = phases, name, None

    def start(self):
        self._span = self.phases(self.name)
        self._span.__enter__()

    def stop(self, *args, **kwargs):
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None

    def elapsed(self, reset=True):
        return 0.0

    def reset(self):
        pass


class _Timers:
    """Stands in for DeepSpeed's SynchronizedWallClockTimer on one optimizer: only the timer names t2i
    knows are timed; `log` prints nothing (t2i's metrics carry the numbers)."""

    def __init__(self, phases: Phases):
        self.phases, self._timers = phases, {}

    def __call__(self, name: str):
        if name not in self._timers:
            part = TIMERS.get(name)
            self._timers[name] = _Timer(self.phases, f"opt.{part}") if part else _Noop()
        return self._timers[name]

    def log(self, *args, **kwargs):
        pass

    def get_timers(self):
        return self._timers


class _Noop:
    def start(self):
        pass

    def stop(self, *args, **kwargs):
        pass

    def elapsed(self, reset=True):
        return 0.0

    def reset(self):
        pass


def install(optimizer, phases: Phases) -> list[str]:
    """Hook `optimizer` (DeepSpeed's ZeRO optimizer instance) so its parts add into `phases`; returns the
    hooked method names. Only when phases are enabled."""
    if not phases.enabled:
        return []
    zero3 = hasattr(optimizer, "_reassign_or_swap_out_partitioned_parameters")
    hooked = []
    for method, part in (METHODS_ZERO3 if zero3 else METHODS).items():
        original = getattr(optimizer, method, None)
        if original is None or not callable(original):
            continue
        setattr(optimizer, method, _timed(original, phases, f"opt.{part}"))
        hooked.append(method)
    if not zero3 and hasattr(optimizer, "timers"):
        optimizer.timers = _Timers(phases)
        hooked.append("timers")
    return hooked


def _timed(fn, phases: Phases, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with phases(name):
            return fn(*args, **kwargs)
    return wrapper


def breakdown(times: dict) -> dict:
    """{part: seconds} of one step from t2i's phase times (`step` and the `opt.*` spans)."""
    t = {k[4:]: v for k, v in times.items() if k.startswith("opt.")}
    if not t:
        return {}
    out = {p: t.get(p, 0.0) for p in ("overflow", "grad_norm", "grads_to_fp32", "update", "copy_back", "allgather")}
    # ZeRO-1/2: `optimizer_gradients` (grads_to_fp32) contains neither the norm nor the overflow check;
    # the `optimizer_step` span contains the update, and the rest of it is the fp32 -> bf16 copy.
    if "update_and_copy_back" in t:
        out["copy_back"] = max(0.0, t["update_and_copy_back"] - out["update"])
    step = times.get("step")
    if step is not None:
        out["other"] = max(0.0, step - sum(out.values()))
    return out
