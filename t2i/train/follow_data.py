"""The shapes defaults follow the data: `t2i train data.shards=<yours>` needs no other edit.

The embedded default config (configs/tiny-cpu.yaml) trains on the synthetic shapes domain and sets
three things that only make sense there. When the training data is not shapes data (by its samples'
json, t2i.data.peek), each of them is replaced and the change logged in one line:

    validation.shards       = the shapes held-out set   -> null: no fixed-sigma validation (set
                                                           validation.shards to held-out shards of yours)
    sample.prompts          = the shapes prompts        -> the first distinct captions of the data
    sample.geneval_per_tag  = the default's 4           -> 0: the live GenEval scores shapes prompts with
                                                           the shapes detector

A value set to anything else is the user's and kept: validation shards of their own, their own
prompts, a live GenEval asked for with another count (kept with a warning: it still scores shapes).
The rule keys on the data's content, not on the data.shards string, so a copy of the shapes set
elsewhere keeps every shapes setting, and a user's data in data/shapes/ does not.

On a fresh start `follow` rewrites the config (and the run folder's config.yaml records the result,
so a resume never re-derives it). On a resume `drop_shapes_requests` removes those shapes values from
what the command line asks for (`--config configs/tiny-cpu.yaml` again on a requeue), so they do not
read as changes to the run's stored config.
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache

from t2i.config import Config, load_config
from t2i.data.peek import Peek, peek

Note = tuple[int, str]  # (logging level, message), logged by rank 0 once the run's log is open


@lru_cache(maxsize=1)
def shapes_defaults() -> tuple:
    """(validation.shards, sample.prompts, sample.geneval_per_tag) of the embedded default config: the
    shapes domain's."""
    cfg = load_config()
    return cfg.validation.shards, tuple(cfg.sample.prompts), cfg.sample.geneval_per_tag


def peek_data(cfg: Config, key: str = "data.shards") -> Peek:
    return peek(cfg.data.shards, key=key, allow_pipe_in_lists=cfg.data.allow_pipe_in_lists,
                max_caption_bytes=cfg.data.max_caption_bytes, captions=max(1, len(cfg.sample.prompts)))


def follow(cfg: Config, data: Peek) -> tuple[Config, list[Note]]:
    """The config with the shapes-only settings replaced when `data` is not shapes data; the notes."""
    if data.shapes:
        return cfg, []
    cfg = copy.deepcopy(cfg)
    notes: list[Note] = []
    val_shards, prompts, per_tag = shapes_defaults()
    what = f"data.shards={_short(cfg.data.shards)} is not the shapes domain"
    if cfg.validation.shards is not None and cfg.validation.shards == val_shards:
        cfg.validation.shards = None
        notes.append((logging.INFO, f"validation off: {what}, and validation.shards is the shapes held-out set; "
                                    f"set validation.shards=<held-out shards of your data> for a fixed-sigma "
                                    f"validation loss"))
    if tuple(cfg.sample.prompts) == prompts:
        if data.captions:
            cfg.sample.prompts = list(data.captions)
            notes.append((logging.INFO, f"sample prompts: {what}; the sample grids use {len(data.captions)} "
                                        f"caption(s) of its first shard instead of the shapes prompts "
                                        f"(set sample.prompts=[...] to choose)"))
        else:
            notes.append((logging.WARNING, f"sample prompts: {what}, but its first samples have no caption; the "
                                           f"sample grids keep the shapes prompts (set sample.prompts=[...])"))
    if cfg.sample.geneval_per_tag == per_tag > 0:
        cfg.sample.geneval_per_tag = 0
        notes.append((logging.INFO, f"live GenEval off: {what} and sample.geneval_per_tag scores shapes prompts "
                                    f"with the shapes detector; evaluate your checkpoints with `t2i eval`"))
    elif cfg.sample.geneval_per_tag > 0:
        notes.append((logging.WARNING, f"sample.geneval_per_tag={cfg.sample.geneval_per_tag} kept as set, but "
                                       f"{what}: the live GenEval scores shapes prompts with the shapes detector"))
    return cfg, notes


def drop_shapes_requests(layer: dict, data: Peek) -> dict:
    """On a resume of a run whose data is not shapes data: the requested config `layer` (a nested
    dict) without the shapes values `follow` would have replaced on a fresh start."""
    if data.shapes:
        return layer
    layer = copy.deepcopy(layer)
    val_shards, prompts, per_tag = shapes_defaults()
    validation, sample = layer.get("validation") or {}, layer.get("sample") or {}
    if "shards" in validation and validation["shards"] is not None and validation["shards"] == val_shards:
        del validation["shards"]
    if "prompts" in sample and isinstance(sample["prompts"], list) and tuple(sample["prompts"]) == prompts:
        del sample["prompts"]
    if sample.get("geneval_per_tag") == per_tag:
        del sample["geneval_per_tag"]
    return layer


def _short(value, limit: int = 100) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit // 2 - 2] + " ... " + text[-(limit // 2 - 3):]
