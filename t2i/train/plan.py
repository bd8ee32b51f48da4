"""What a `t2i train` command line means, decided before any rank starts.

`t2i.cli` calls `plan_training` in the process the user started, before torchrun launches ranks, and
every rank calls it again with the same command line (under torchrun or srun) and gets the same
answer. So a mistake ends as one line and exit code 2 before a rank exists, instead of in N ranks at
once under torchrun's failure report:

1. where the run is (run.output_dir / run.name of the command line), that no live run holds it, and
   which checkpoint a resume continues from (`--resume` without one fails here);
2. the config, its geometry checked first: on a resume the run's own config.yaml with the allowed
   overrides over it (t2i.train.resume_config); on a fresh start defaults <- --config <- overrides,
   with the shapes defaults following the data (t2i.train.follow_data); a resume refuses identity
   changes (a `--config` that differs from the run's config.yaml) before it reads any data;
3. the data: every shard of data.shards and validation.shards exists (the message names the key,
   and on a resume the run's config.yaml it came from);
4. notes for the run's log: what the resume changed, what followed the data, odd values
   (t2i.config_warnings). Rank 0 logs them once its log is open, so they land in train.log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from t2i.checkpoint import store
from t2i.config import Config, load_config
from t2i.config_warnings import odd_values
from t2i.data.peek import Peek
from t2i.data.shards import expand_shards
from t2i.models import lora
from t2i.models.geometry import check_geometry
from t2i.train import follow_data, resume_config
from t2i.train.lock import RunLock
from t2i.train.run import resume_tag

Note = tuple[int, str]  # (logging level, message)
_NOT_SHAPES = Peek(urls=[], shapes=False)  # drop_shapes_requests on data not yet read: every shapes value may go


def plan_training(config_path: str | None, overrides: list[str], resume: bool | str = False, *,
                  force_override: bool = False) -> tuple[Config, list[Note]]:
    """(the config to train with, notes to log). `resume`: False, True, "auto" or a tag (as --resume
    TAG). Raises T2IError subclasses for everything a user can fix."""
    where = resume_config.location(config_path, overrides)
    run_dir = Path(where[0]) / where[1]
    if "RANK" not in os.environ:  # the process the user started; ranks check it when they take the lock
        RunLock(run_dir).check_free()  # a run in use is named as such, before "already holds a run"
    tag = resume_tag(run_dir, resume)
    notes: list[Note] = []
    stored = None
    if tag is None:
        cfg = load_config(config_path, overrides)
        check_geometry(cfg)  # a config mistake first, then the data
        lora.check_config(cfg)  # lora.targets / lora.blocks against the model (meta device, no weights)
        cfg, notes = follow_data.follow(cfg, follow_data.peek_data(cfg))
        if force_override:
            notes.append((logging.WARNING, "--force-override has no effect: this is not a resume"))
    else:
        stored = resume_config.load_run_config(run_dir)
        layer = resume_config.requested(config_path, overrides)
        step = store.read_meta(run_dir / "checkpoints", tag)["step"]
        judge = dict(force=force_override, overrides=overrides, config_path=config_path)
        if _asks_for_shapes_settings(layer):  # judged on the data the resumed run reads (a forced new one too)
            # Identity changes are refused before any data is read: a --config file that names other data
            # (configs/tiny-cpu.yaml's shapes shards) is "differs from the run's config.yaml", not "shards not
            # found". Judged without the shapes values the data may drop; all of it is reviewed again below.
            maybe = follow_data.drop_shapes_requests(layer, _NOT_SHAPES)
            resume_config.refuse(stored, resume_config.overlay(stored, maybe, where), run_dir, step, **judge)
            cfg = resume_config.overlay(stored, layer, where)
            key = f"data.shards (from {run_dir / 'config.yaml'})" if cfg.data.shards == stored.data.shards else None
            layer = follow_data.drop_shapes_requests(layer, follow_data.peek_data(cfg, key or "data.shards"))
        cfg = resume_config.overlay(stored, layer, where)
        notes = resume_config.review(stored, cfg, run_dir, step, **judge)
        check_geometry(cfg)
    check_shards(cfg, stored, run_dir)
    notes += [(logging.WARNING, line) for line in odd_values(cfg)]
    return cfg, notes


def check_shards(cfg: Config, stored: Config | None = None, run_dir: Path | None = None) -> None:
    """Every local shard of data.shards and validation.shards exists (DataError naming the key, and the
    run's config.yaml when a resume took the value from there)."""
    specs = {"data.shards": (cfg.data.shards, stored and stored.data.shards),
             "validation.shards": (cfg.validation.shards, stored and stored.validation.shards)}
    for key, (spec, before) in specs.items():
        if spec is not None:
            where = f" (from {run_dir / 'config.yaml'})" if stored is not None and spec == before else ""
            expand_shards(spec, allow_pipe_in_lists=cfg.data.allow_pipe_in_lists, key=key + where)


def _asks_for_shapes_settings(layer: dict) -> bool:
    return "shards" in (layer.get("validation") or {}) or bool(
        {"prompts", "geneval_per_tag"} & set(layer.get("sample") or {}))
