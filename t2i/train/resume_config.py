"""A resumed run continues with its own config, `<run>/config.yaml`, never with today's defaults.

`t2i train run.name=r --resume` rebuilds nothing from configs/tiny-cpu.yaml: the config the run was
started with (the resolved one every run writes into its folder) is the base, and what the command
line states (a `--config` file, `key=value` overrides) is laid over it. Whatever that changes is
either allowed mid-run, or refused:

* allowed (MUTABLE): how long and how the run is watched and kept: `train.steps` (and so where the
  LR schedule ends), checkpoint and log cadence, `train.keep_last`, bad-sample and non-finite limits,
  validation cadence, everything under `logging.` and `sample.`, and `model.compile` /
  `model.gradient_checkpointing` (speed and memory, not the maths). Each change is logged.
* refused: everything else, which makes the run what it is: model, text encoders, VAE, data,
  objective, timesteps, optimizer and LR, seed, ZeRO stage and precision, batch, validation set. The
  error names the keys; `--force-override` applies them anyway (e.g. after moving the data). When a
  refused key comes from the `--config` file, the error says that file differs from the run's own
  config.yaml (a resume needs no --config), and it comes before any data of the new value is read.

A value equal to the stored one is not a change, so a requeued SLURM job that repeats its command line
(`--config X key=value ... --auto-resume`) resumes as it is. `run.name` and `run.output_dir` say where
the run is, not what it is: they are never compared (a run folder may be moved or copied).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from t2i.config import DEFAULT_CONFIG, Config, RunConfig, apply_override, deep_merge, from_dict, read_yaml, to_dict
from t2i.errors import ConfigError

Note = tuple[int, str]  # (logging level, message)

MUTABLE = ("train.steps", "train.ckpt_every", "train.keep_last", "train.log_every",
           "train.max_consecutive_nonfinite", "data.max_bad_fraction", "data.bad_check_after", "validation.every",
           "model.compile", "model.gradient_checkpointing", "logging.", "sample.")
LOCATION = ("run.name", "run.output_dir")
IDENTITY = "model, data, objective, seed, ZeRO stage, batch, optimizer"


def is_mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE)


def requested(config_path: str | None, overrides: list[str]) -> dict:
    """What the command line states, as a nested dict: the --config file (with its `base:` chain)
    and the overrides over it. Without --config only the overrides: the default config is not
    re-applied to a run that has its own."""
    data = read_yaml(Path(config_path)) if config_path else {}
    for item in overrides:
        apply_override(data, item)
    return data


def location(config_path: str | None, overrides: list[str]) -> tuple[str, str]:
    """(run.output_dir, run.name) the command line points at, without validating anything else."""
    data = read_yaml(Path(config_path) if config_path else DEFAULT_CONFIG)
    for item in overrides:
        apply_override(data, item)
    run = data.get("run") or {}
    defaults = RunConfig()
    return str(run.get("output_dir", defaults.output_dir)), str(run.get("name", defaults.name))


def load_run_config(run_dir: Path) -> Config:
    """The run's own config (<run>/config.yaml), validated; a ConfigError names the file."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found (every run writes it when it starts); pass the run's "
                          f"config with --config and --force-override to resume anyway")
    try:
        return from_dict(read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def overlay(stored: Config, layer: dict, where: tuple[str, str]) -> Config:
    """The stored config with the requested layer over it, at the run's current location."""
    merged = deep_merge(to_dict(stored), layer)
    merged["run"] = {**merged["run"], "output_dir": where[0], "name": where[1]}
    return from_dict(merged)


def changes(stored: Config, new: Config) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, new value) for every leaf that differs (dicts compared key by key)."""
    a, b = _leaves(to_dict(stored)), _leaves(to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=_order(a, b))
            if k not in LOCATION and a.get(k) != b.get(k)]


def review(stored: Config, new: Config, run_dir: Path, step: int, *, force: bool, overrides: list[str],
           config_path: str | None) -> list[Note]:
    """Refuse identity changes (unless `force`) and steps below the checkpoint; notes for the rest."""
    refuse(stored, new, run_dir, step, force=force, overrides=overrides, config_path=config_path)
    diff = changes(stored, new)
    notes: list[Note] = [(logging.INFO, f"config: the run's own {run_dir / 'config.yaml'}"
                                        f"{' + ' + str(len(diff)) + ' change(s)' if diff else ' (unchanged)'}")]
    for key, old, val in diff:
        source = _source(key, overrides, config_path)
        if is_mutable(key):
            lr = _lr_note(key, stored, new, step)
            notes.append((logging.INFO, f"resume: {key} {_show(old)} -> {_show(val)} ({source}){lr}"))
        else:
            notes.append((logging.WARNING, f"resume: {key} {_show(old)} -> {_show(val)} ({source}; --force-override: "
                                           f"this changes what the run is)"))
    return notes


def refuse(stored: Config, new: Config, run_dir: Path, step: int, *, force: bool, overrides: list[str],
           config_path: str | None) -> None:
    """The ConfigError of `review`, alone: t2i.train.plan calls it before reading any data for `new`.

    When a refused key comes from the `--config` file (not from a `key=value`), the message says that
    file differs from the run's own config.yaml: a resume reads that one, and needs no --config."""
    refused = [c for c in changes(stored, new) if not is_mutable(c[0])]
    if refused and not force:
        it = "it" if len(refused) == 1 else "them"
        from_file = [k for k, _, _ in refused if config_path and _source(k, overrides, config_path) != "command line"]
        if from_file:
            mixed = len(from_file) < len(refused)
            listed = ", ".join(f"{k} {_show(old)} -> {_show(val)}"
                               f"{' (command line)' if mixed and k not in from_file else ''}" for k, old, val in refused)
            raise ConfigError(f"--resume: --config {config_path} differs from the run's own {run_dir / 'config.yaml'} "
                              f"in what makes the run what it is ({IDENTITY}): {listed}; a resume needs no --config: "
                              f"`{_resume_command(run_dir)}` reads the run's own config; else start a new run "
                              f"(another run.name), or pass --force-override to apply {it} anyway")
        listed = ", ".join(f"{k} {_show(old)} -> {_show(val)}" for k, old, val in refused)
        raise ConfigError(f"--resume: {'this' if len(refused) == 1 else 'these'} would change what {run_dir} is "
                          f"({IDENTITY}; kept in {run_dir / 'config.yaml'}): {listed}; start a new run (another "
                          f"run.name), or pass --force-override to apply {it} anyway")
    if new.train.steps < step:
        raise ConfigError(f"--resume: train.steps={new.train.steps} is below the step of the checkpoint it "
                          f"resumes from ({step}); nothing would be trained")


def _resume_command(run_dir: Path) -> str:
    """`t2i train [run.output_dir=D] run.name=N --resume` for the run in `run_dir`."""
    where = "" if str(run_dir.parent) == RunConfig().output_dir else f"{shlex.quote(f'run.output_dir={run_dir.parent}')} "
    return f"t2i train {where}{shlex.quote(f'run.name={run_dir.name}')} --resume"


def _lr_note(key: str, stored: Config, new: Config, step: int) -> str:
    """Where the LR schedule ends moves with train.steps: say what that does to the LR right now."""
    if key != "train.steps" or new.train.schedule != "cosine":
        return ""
    from t2i.train.engine import lr_at
    before, after = lr_at(step, stored.train), lr_at(step, new.train)
    return f"; the cosine schedule now ends at step {new.train.steps}: lr at step {step} {before:.3g} -> {after:.3g}"


def _source(key: str, overrides: list[str], config_path: str | None) -> str:
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    if any(key == k or key.startswith(k + ".") for k in keys):
        return "command line"
    return f"--config {config_path}" if config_path else "command line"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty dict has no leaves: {} -> {a: 1} reads "key.a None -> 1"
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _order(a: dict, b: dict):
    """Schema order (the config file's), then keys only one side has."""
    keys = list(a) + [k for k in b if k not in a]
    return lambda k: keys.index(k)


def _show(value, limit: int = 160) -> str:
    """repr, long ones cut in the middle (a path's file name stays visible)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit // 2 - 2] + " ... " + text[-(limit // 2 - 3):]
