"""An SD3 / SD3.5 diffusers folder: what it holds, what `model.pretrained=<folder>` implies, and the
checks that run before any `from_pretrained`.

Why: one release folder holds every frozen part (stabilityai/stable-diffusion-3.5-medium):

    model_index.json  transformer/  vae/  text_encoder/ (CLIP-L)  text_encoder_2/ (OpenCLIP bigG)
    text_encoder_3/ (T5)  tokenizer/  tokenizer_2/  tokenizer_3/  scheduler/

so naming it once is enough. When `model.pretrained` is such a folder (it has model_index.json or a
vae/ or text_encoder*/ subfolder) `implied_by_pretrained` fills what the config leaves unset:
text.preset=sd3 + text.sd3_folder (+ clip_context 77, which real CLIP weights need), vae.kind=pretrained +
vae.path, and sample.shift / train.timesteps.shift from scheduler/scheduler_config.json. Any of them set
in the config or an override wins. A bare transformer folder (config.json at its root) implies nothing.

Shipped configs carry placeholder paths (`/path/to/...`): a config with one still loads and prints (so
`t2i config` shows what to fill in), but training, caching or loading weights refuses it
(`refuse_placeholders`). A folder lacking a part is one line naming the subfolder; transformers would
otherwise read the missing local path as a hub repo id and fail 50 lines later with "Repo id must be
in the form 'repo_name'".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from t2i.errors import ConfigError

PLACEHOLDER_PREFIX = "/path/to/"  # how shipped configs spell "your local copy goes here"
PARTS = {  # subfolder -> what it holds
    "transformer": "MMDiT", "vae": "VAE", "text_encoder": "CLIP-L", "text_encoder_2": "OpenCLIP bigG",
    "text_encoder_3": "T5", "tokenizer": "CLIP-L tokenizer", "tokenizer_2": "bigG tokenizer",
    "tokenizer_3": "T5 tokenizer", "scheduler": "scheduler",
}
LAYOUT = "transformer/ vae/ text_encoder/ text_encoder_2/ text_encoder_3/ tokenizer*/ scheduler/"
PATH_KEYS = ("model.pretrained", "text.sd3_folder", "text.clip_l", "text.clip_g", "text.t5", "vae.path",
             "train.init_from")  # every config key that names a local weights path


def is_placeholder(path) -> bool:
    return isinstance(path, str) and path.startswith(PLACEHOLDER_PREFIX)


def is_pipeline_folder(path) -> bool:
    """A diffusers pipeline folder (not a bare transformer folder): model_index.json or a vae/ or
    text_encoder*/ subfolder."""
    root = Path(path)
    return (root / "model_index.json").is_file() or any(
        (root / sub).is_dir() for sub in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))


def scheduler_shift(path) -> Optional[float]:
    """`shift` of <path>/scheduler/scheduler_config.json, or None when there is none."""
    try:
        value = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text()).get("shift")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------
# model.pretrained=<folder> -> text encoders, VAE, scheduler (on the raw config dict, before typing)
# ----------------------------------------------------------------------------------------------


def implied_by_pretrained(data: dict, user: Optional[dict] = None) -> list[str]:
    """Fill the keys `model.pretrained` implies into the raw config dict `data` where `user` (what the user
    wrote: their config file and overrides; default `data`) leaves them unset. The embedded default
    config (configs/tiny-cpu.yaml) spells out the tiny encoders but counts as defaults, so
    `t2i train model.pretrained=<folder>` needs no other key. Returns the implied "key=value" strings."""
    user = data if user is None else user
    folder = _at(data, "model", "pretrained")
    if not isinstance(folder, str) or not folder or not (is_placeholder(folder) or is_pipeline_folder(folder)):
        return []
    implied: list[str] = []

    def unset(*path: str) -> bool:
        return _at(user, *path, missing=_MISSING) is _MISSING

    def put(value, *path: str) -> None:
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        implied.append(f"{'.'.join(path)}={value}")

    if unset("text", "preset") and not any(_at(user, "text", k) for k in ("sd3_folder", "clip_l", "clip_g", "t5")):
        put("sd3", "text", "preset")
    if _at(data, "text", "preset") == "sd3":
        if unset("text", "sd3_folder"):
            put(folder, "text", "sd3_folder")
        for key, value in (("clip_context", 77), ("max_t5_tokens", 256)):  # real CLIP weights; the pipeline's
            if unset("text", key) and _at(data, "text", key) not in (None, value):
                put(value, "text", key)
    if unset("vae", "kind") and unset("vae", "path"):
        put("pretrained", "vae", "kind")
    if _at(data, "vae", "kind") == "pretrained" and unset("vae", "path"):
        put(folder, "vae", "path")
    if unset("sample", "guidance_interval") and _at(data, "sample", "guidance_interval") != [0.0, 1.0]:
        put([0.0, 1.0], "sample", "guidance_interval")  # the pipeline guides every step; the toy's [0, 0.4] is its own
    shift = None if is_placeholder(folder) else scheduler_shift(folder)
    if shift is not None:
        for path in (("sample", "shift"), ("train", "timesteps", "shift")):
            if unset(*path) and _at(data, *path) != shift:
                put(shift, *path)
    return implied


_MISSING = object()


def _at(data, *path: str, missing=None):
    """data[path[0]][path[1]]..., or `missing` when a level is absent or not a mapping."""
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return missing
        data = data[part]
    return data


# ----------------------------------------------------------------------------------------------
# Checks: placeholders, folders and their parts
# ----------------------------------------------------------------------------------------------


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def placeholders(cfg) -> list[tuple[str, str]]:
    """(key, value) of every weights path in `cfg` that is still a shipped placeholder."""
    return [(k, _get(cfg, k)) for k in PATH_KEYS if is_placeholder(_get(cfg, k))]


WHAT_TO_SET = {  # key -> what its value should name
    "model.pretrained": "your local SD3/SD3.5 folder (e.g. /models/{name})",
    "train.init_from": "the weights to post-train from: the release folder (as model.pretrained) or a t2i run",
    "text.sd3_folder": "a local SD3/SD3.5 folder with text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/",
    "vae.path": "a local SD3/SD3.5 folder (its vae/) or an AutoencoderKL folder",
    "text.clip_l": "a local open_clip ViT-L-14 state dict", "text.clip_g": "a local open_clip ViT-bigG-14 state dict",
    "text.t5": "a local transformers T5 encoder folder with its tokenizer",
}


def placeholder_message(key: str, value: str) -> str:
    what = WHAT_TO_SET[key].format(name=Path(value).name)
    return f"{key}: set this to {what}; {value} is the example config's placeholder"


def refuse_placeholders(cfg) -> None:
    """Before training, caching or loading weights: every placeholder path is an error naming its key."""
    found = placeholders(cfg)
    model = cfg.model.pretrained
    # text.sd3_folder / vae.path holding model.pretrained's own placeholder follow it (when it implied them)
    found = [(k, v) for k, v in found if k == "model.pretrained" or k == "train.init_from" or v != model]
    if found:
        key, value = found[0]
        more = f" (also: {', '.join(k for k, _ in found[1:])})" if len(found) > 1 else ""
        raise ConfigError(placeholder_message(key, value) + more)


def missing_part(key: str, path: str, part: str, what: Optional[str] = None) -> ConfigError:
    return ConfigError(f"{key}={path}: no {part}/ ({what or PARTS[part]}) in {path}; an SD3/SD3.5 folder has "
                       f"{LAYOUT}")


def require(key: str, path: str, parts, files: bool = False) -> None:
    """`path` (named by `key`) is a folder with every subfolder in `parts`; with `files`, each model
    subfolder also has its config.json (what from_pretrained reads first). Raises ConfigError."""
    if is_placeholder(path):
        raise ConfigError(placeholder_message(key, path))
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{key}={path}: {'not a folder' if root.exists() else 'folder not found'}; an "
                          f"SD3/SD3.5 folder has {LAYOUT}")
    for part in parts:
        if not (root / part).is_dir():
            raise missing_part(key, path, part)
        if files and not part.startswith(("tokenizer", "scheduler")) and not (root / part / "config.json").is_file():
            raise ConfigError(f"{key}={path}: {part}/ has no config.json ({PARTS[part]} weights incomplete?); an "
                              f"SD3/SD3.5 folder has {LAYOUT}")


def text_parts(text) -> list[str]:
    """The subfolders of text.sd3_folder the text encoders read (explicit clip_l / clip_g / t5 paths replace
    their part; tokenizer/ and tokenizer_2/ are optional: SD3's settings are the fallback)."""
    parts = [] if text.clip_l else ["text_encoder"]
    parts += [] if text.clip_g else ["text_encoder_2"]
    parts += [] if text.t5 else ["text_encoder_3", "tokenizer_3"]
    return parts


def key_for(cfg, path: str, own_key: str) -> str:
    """model.pretrained when `path` is that folder (implied by it, or the same folder named twice), else
    the component's own key."""
    return "model.pretrained" if path and path == cfg.model.pretrained else own_key


def check_config(cfg) -> None:
    """At load: every local folder a config names exists with the subfolders that will be read (no
    weights are read; placeholders pass here and are refused by refuse_placeholders at use)."""
    model = cfg.model.pretrained
    if model and not is_placeholder(model):
        root = Path(model)
        if is_pipeline_folder(model) or not (root / "config.json").is_file():
            require("model.pretrained", model, ["transformer"])
    t = cfg.text
    if t.preset == "sd3" and t.sd3_folder and not is_placeholder(t.sd3_folder):
        require(key_for(cfg, t.sd3_folder, "text.sd3_folder"), t.sd3_folder, text_parts(t))
    v = cfg.vae
    if v.kind == "pretrained" and v.path and not is_placeholder(v.path):
        if not (Path(v.path) / "config.json").is_file():
            require(key_for(cfg, v.path, "vae.path"), v.path, ["vae"])
