"""A look at the first samples of a shard spec, before training: which domain is it, what do its
captions say.

The embedded default config is the synthetic shapes domain, and three of its settings only make
sense there (the held-out shapes shards for validation, shapes prompts for the sample grids, the
shapes GenEval in training). `t2i train data.shards=<yours>` must not inherit them, and the rule
that decides (t2i.train.follow_data) needs two facts about the data, read here from the first
samples of its first shard in file order (cheap: one tar header walk, no image decoding):

* `shapes`: the samples carry the shapes domain's ground truth in their `json` (`tag` one of
  GenEval's six, `objects`, `include`), as `t2i make-shards shapes` writes it. Captions alone
  would not do: a user's captions may well read "a photo of a red circle".
* `captions`: the first distinct captions (the loader's caption rule, t2i.data.decode), to draw
  sample grids of prompts that describe the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from t2i.data.decode import caption_candidates
from t2i.data.shards import expand_shards, shard_items
from t2i.geneval_spec import TAGS


@dataclass
class Peek:
    urls: list[str]                 # the shards the spec names
    shapes: bool                    # the first sample is a shapes-domain sample
    captions: list[str] = field(default_factory=list)  # distinct captions of the first samples, file order


def is_shapes_meta(meta) -> bool:
    """A sample's json is the shapes domain's ground truth (t2i.data.shapes.make_sample)."""
    return (isinstance(meta, dict) and meta.get("tag") in TAGS and isinstance(meta.get("objects"), list)
            and "include" in meta)


def peek(spec, *, key: str = "data.shards", allow_pipe_in_lists: bool = False, max_caption_bytes: int = 2048,
         samples: int = 64, captions: int = 8) -> Peek:
    """Read up to `samples` samples of the first shard of `spec` (DataError when shards are missing,
    naming `key`); collect up to `captions` distinct captions."""
    urls = expand_shards(spec, allow_pipe_in_lists=allow_pipe_in_lists, key=key)
    found: list[str] = []
    shapes = None
    for n, raw in enumerate(shard_items(urls[0])):
        if n >= samples or "__event__" in raw:
            break
        if shapes is None:
            shapes = is_shapes_meta(_json(raw))
        for text, _ in caption_candidates(raw, max_caption_bytes)[1][:1]:
            if text not in found:
                found.append(text)
        if len(found) >= captions:
            break
    return Peek(urls=urls, shapes=bool(shapes), captions=found)


def _json(raw: dict):
    try:
        return json.loads(raw["json"]) if "json" in raw else None
    except ValueError:
        return None
