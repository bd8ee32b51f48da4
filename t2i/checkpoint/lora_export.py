"""A LoRA adapter of an SD3/SD3.5 transformer as diffusers loads it, and back.

    write_diffusers_lora(state, config, out)   <out>/pytorch_lora_weights.safetensors
                                                   tensors   transformer.<peft key>, e.g.
                                                             transformer.transformer_blocks.0.attn.to_q.lora_A.weight
                                                   __metadata__["lora_adapter_metadata"]: JSON of the LoraConfig
                                                             arguments, each key prefixed: transformer.r,
                                                             transformer.lora_alpha, transformer.target_modules, ...
                                               <out>/t2i_lora.json   provenance (base folder and hash, run, tag),
                                                             the full LoraConfig, the weight file's sha256
    read_lora(path)                            (state dict without the transformer. prefix, LoraConfig arguments)
    count_lora_keys(pipe_or_transformer)       LoRA tensors a diffusers transformer holds (the zero-key check)
    check_loaded(pipe_or_transformer, state)   every adapter tensor is in the model with the same values

The file is written by diffusers' own writer (StableDiffusion3Pipeline.save_lora_weights) so that
`pipe.load_lora_weights(out)` reads it. Two diffusers behaviours this module guards against:

- Without `lora_adapter_metadata` in the file, diffusers builds the LoraConfig from the tensors: r from
  lora_B's shape and lora_alpha = r. An adapter trained with alpha != r then loads silently rescaled by
  r / alpha. The metadata is therefore always written, and the writer refuses a config without lora_alpha.
- diffusers loads only the keys under `transformer.` and injects only the modules that the config's
  target_modules name; anything else is dropped with at most a log line (diffusers#9950: zero keys
  loaded). The writer refuses an adapter whose modules the config does not target; after a load,
  count_lora_keys / check_loaded say what actually arrived.

diffusers' writer takes no metadata of its own (a custom save_function replaces the one that writes the
adapter metadata), so t2i's provenance lives in the sidecar t2i_lora.json. Extra keys inside the
adapter metadata would break the load: diffusers passes them all to LoraConfig(**metadata).

Adapters are read as safetensors only. A pickled adapter (.bin/.pt/.pth/.ckpt, also under another name)
is refused: unpickling a file can run code (docs/reliability.md); convert it where the file is trusted.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from t2i.errors import CheckpointError
from t2i.io import file_sha256, write_json
from t2i.trust import PICKLE_SUFFIXES

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
SIDECAR = "t2i_lora.json"
PREFIX = "transformer"  # SD3LoraLoaderMixin.transformer_name
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
LORA_TENSORS = (".lora_A.", ".lora_B.")
# Always written, even when equal to peft's defaults: they decide the adapter's effect, and a reader
# with another peft version (other defaults) must not guess them.
ESSENTIAL = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "lora_bias", "rank_pattern",
             "alpha_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "lora_dropout")
# peft bookkeeping that says nothing about the adapter's weights.
BOOKKEEPING = ("peft_version", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode", "task_type",
               "peft_type")


# ---------------------------------------------------------------------------------------------- writing

def json_safe(value, where: str = "lora_config"):
    """`value` with sets as sorted lists, tuples as lists and enums as their values; anything else that
    JSON cannot hold is refused naming its key."""
    if isinstance(value, enum.Enum):
        return json_safe(value.value, where)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v, where) for v in value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"{where}: a {type(value).__name__} cannot be stored as adapter metadata (JSON); "
                          "pass LoraConfig.to_dict() values (numbers, strings, lists, dicts)")


def adapter_metadata(lora_config) -> dict:
    """The LoraConfig arguments diffusers will call LoraConfig(**...) with: `lora_config` (a peft LoraConfig or
    its to_dict()) made JSON-safe, without peft's bookkeeping and without values equal to this peft's defaults
    (so an older peft can read it), except ESSENTIAL, which are always kept."""
    import peft

    config = lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config)
    config = json_safe(config)
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise CheckpointError(f"lora_config has no {key}: without it diffusers would guess it from the tensors "
                                  "(lora_alpha = r, a silent rescale when they differ); pass LoraConfig(...).to_dict()")
    defaults = json_safe(peft.LoraConfig().to_dict())
    return {k: v for k, v in config.items()
            if k in ESSENTIAL or (k not in BOOKKEEPING and (k not in defaults or defaults[k] != v))}


def _strip_prefix(state: dict) -> dict:
    return {k.removeprefix(f"{PREFIX}."): v for k, v in state.items()}


def check_targets(adapter_state: dict, metadata: dict) -> None:
    """Refuse an adapter diffusers would load partly: keys that are not peft LoRA tensors, or modules that the
    config's target_modules do not name (diffusers would inject other modules and drop these keys)."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    if not adapter_state:
        raise CheckpointError("the adapter state dict is empty: nothing to export")
    odd = [k for k in adapter_state if not any(t in k for t in LORA_TENSORS)]
    if odd:
        raise CheckpointError(f"{len(odd)} adapter key(s) are not peft LoRA tensors (lora_A / lora_B), first "
                              f"{odd[0]!r}; pass peft.get_peft_model_state_dict(transformer)")
    named = [k for k in adapter_state if k.split(".lora_")[1].count(".") > 1]  # lora_A.<adapter>.weight
    if named:
        raise CheckpointError(f"adapter key {named[0]!r} carries an adapter name; pass "
                              "peft.get_peft_model_state_dict(transformer), whose keys end in lora_A.weight")
    try:
        config = peft.LoraConfig(**metadata)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"lora_config cannot build a peft LoraConfig, so diffusers could not load it: "
                              f"{e}") from None
    modules = sorted({k.split(".lora_")[0] for k in adapter_state})
    missed = [m for m in modules if not check_target_module_exists(config, m)]  # an excluded module is falsy
    if missed:
        raise CheckpointError(f"{len(missed)} of the adapter's {len(modules)} modules are not in lora_config's "
                              f"target_modules (first {missed[0]!r}): diffusers would not load their tensors; "
                              "pass the LoraConfig the adapter was injected with")




def write_diffusers_lora(adapter_state: dict, lora_config, out_dir, provenance: dict | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (diffusers' format, adapter metadata included) and
    `out_dir/t2i_lora.json`; returns the weight file's path.

    adapter_state: peft.get_peft_model_state_dict(transformer) (keys like
    transformer_blocks.0.attn.to_q.lora_A.weight; a `transformer.` prefix is accepted and not doubled).
    lora_config: peft.LoraConfig(...) or its to_dict(). provenance: e.g. base folder, base hash, run, tag;
    stored in the sidecar. The weights are written under a temporary name and renamed into place."""
    import diffusers
    import peft
    from diffusers import StableDiffusion3Pipeline

    state = _strip_prefix(adapter_state)
    metadata = adapter_metadata(lora_config)
    check_targets(state, metadata)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{WEIGHT_NAME}.", dir=out))
    try:
        # diffusers' writer: prefixes the tensors and the metadata keys with "transformer." and stores the
        # metadata as JSON under __metadata__["lora_adapter_metadata"] (it mutates the dict it is given).
        StableDiffusion3Pipeline.save_lora_weights(staging, transformer_lora_layers=tensors,
                                                   transformer_lora_adapter_metadata=dict(metadata),
                                                   safe_serialization=True)
        os.chmod(staging / WEIGHT_NAME, 0o644)
        os.replace(staging / WEIGHT_NAME, out / WEIGHT_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = out / WEIGHT_NAME
    written, stored = read_lora(path)  # what a reader will see, before anyone relies on it
    if set(written) != set(state) or stored.get("lora_alpha") != metadata["lora_alpha"]:
        raise CheckpointError(f"{path}: written with {len(written)} of {len(state)} tensors or another lora_alpha "
                              f"({stored.get('lora_alpha')} for {metadata['lora_alpha']}); diffusers' writer changed")
    full = json_safe(lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config))
    write_json(out / SIDECAR, {
        "file": WEIGHT_NAME, "sha256": file_sha256(path), "format": "diffusers LoRA: peft keys under 'transformer.', "
        f"LoraConfig arguments in the safetensors metadata '{METADATA_KEY}'",
        "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
        "r": metadata["r"], "lora_alpha": metadata["lora_alpha"],
        "modules": len({k.split(".lora_")[0] for k in tensors}), "lora_config": full,
        "provenance": json_safe(provenance or {}, "provenance"),
        "versions": {"diffusers": diffusers.__version__, "peft": peft.__version__, "torch": torch.__version__}},
        indent=1)
    return path


# ---------------------------------------------------------------------------------------------- reading

def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch's zip format / a bare pickle


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickled adapter: t2i reads LoRA adapters only as safetensors, because loading a pickle can "
        "run code (docs/reliability.md). Convert it where you trust the file: state = torch.load(file, "
        "weights_only=True), then t2i.checkpoint.lora_export.write_diffusers_lora(state, lora_config, out) with "
        "the adapter's r, lora_alpha and target_modules (a pickle carries no adapter metadata; without it "
        "diffusers assumes lora_alpha = r)")


def weight_file(path) -> Path:
    """`path` itself, or the folder's pytorch_lora_weights.safetensors; pickles are refused."""
    path = Path(path)
    if path.is_dir():
        file = path / WEIGHT_NAME
        if not file.is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _refuse_pickle(path / pickles[0])
            held = sorted(p.name for p in path.iterdir())
            raise CheckpointError(f"{path} has no {WEIGHT_NAME} (it holds: {', '.join(held[:8]) or 'nothing'}"
                                  f"{' ...' if len(held) > 8 else ''})")
        path = file
    if not path.is_file():
        raise CheckpointError(f"LoRA adapter not found: {path}")
    if path.suffix in PICKLE_SUFFIXES or _looks_pickled(path):
        raise _refuse_pickle(path)
    return path


def _describe(keys: list[str]) -> str:
    tops = Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in tops.most_common(4)) + (" ..." if len(tops) > 4 else "")


def read_lora(path) -> tuple[dict, dict]:
    """(state dict without the `transformer.` prefix, LoraConfig arguments) of a diffusers LoRA file or of a
    folder holding pytorch_lora_weights.safetensors. A file without adapter metadata gets what diffusers
    would assume (r from the tensors, lora_alpha = r), with a warning. Tensors under other prefixes (text
    encoder LoRAs) are left out with a warning."""
    from safetensors import SafetensorError, safe_open

    file = weight_file(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            keys = list(f.keys())
            ours = [k for k in keys if k.startswith(f"{PREFIX}.")]
            state = {k.removeprefix(f"{PREFIX}."): f.get_tensor(k) for k in ours}
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    if not ours:
        raise CheckpointError(f"{file} holds no transformer LoRA: {len(keys)} tensor(s), none under '{PREFIX}.' "
                              f"({_describe(keys) if keys else 'empty'}); t2i exports adapters of the transformer")
    lora = [k for k in state if any(t in k for t in LORA_TENSORS)]
    if not lora:
        raise CheckpointError(f"{file} holds {len(ours)} transformer tensor(s) but no LoRA (lora_A / lora_B) keys, "
                              f"e.g. {ours[0]!r}: full weights or another adapter format, not a peft LoRA")
    if len(lora) != len(state):
        other = next(k for k in state if k not in lora)
        raise CheckpointError(f"{file} mixes {len(lora)} LoRA tensor(s) with {len(state) - len(lora)} other "
                              f"transformer tensor(s), e.g. '{PREFIX}.{other}'; t2i reads peft LoRA adapters only")
    if len(ours) != len(keys):
        warnings.warn(f"{file}: {len(keys) - len(ours)} tensor(s) outside '{PREFIX}.' left out "
                      f"({_describe([k for k in keys if k not in ours])})", stacklevel=2)
    raw = header.get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: its '{METADATA_KEY}' is not JSON ({e})") from None
    config = {k.removeprefix(f"{PREFIX}."): v for k, v in meta.items() if k.startswith(f"{PREFIX}.")}
    ranks = Counter(int(t.shape[0]) for k, t in state.items() if ".lora_A." in k)
    if not config:
        r = ranks.most_common(1)[0][0]
        config = {"r": r, "lora_alpha": r, "target_modules": sorted({k.split(".lora_")[0] for k in state})}
        warnings.warn(f"{file} has no adapter metadata: lora_alpha is taken as r = {r}, as diffusers does; if the "
                      "adapter was trained with another alpha its effect is rescaled (write it with "
                      "write_diffusers_lora)", stacklevel=2)
    elif "r" not in config or "lora_alpha" not in config:
        raise CheckpointError(f"{file}: its adapter metadata lacks r or lora_alpha (has {sorted(config)})")
    elif not config.get("rank_pattern") and set(ranks) != {config["r"]}:
        raise CheckpointError(f"{file}: its metadata says r = {config['r']} but lora_A has rank(s) {sorted(ranks)}")
    return state, config


def read_provenance(path) -> dict | None:
    """The sidecar t2i_lora.json next to the weights (None without one); `matches` says whether its sha256 is
    the weight file's (False: the weights were replaced after the sidecar was written)."""
    file = weight_file(path)
    sidecar = file.parent / SIDECAR
    if not sidecar.is_file():
        return None
    info = json.loads(sidecar.read_text())
    info["matches"] = info.get("file") == file.name and info.get("sha256") == file_sha256(file)
    return info


# ---------------------------------------------------------------------------------------------- after a load

def _transformer(pipeline_or_transformer) -> torch.nn.Module:
    transformer = getattr(pipeline_or_transformer, "transformer", None)
    return pipeline_or_transformer if transformer is None else transformer


def count_lora_keys(pipeline_or_transformer, adapter_name: str | None = None) -> int:
    """LoRA tensors (lora_A / lora_B parameters) a diffusers transformer holds, e.g. after
    pipe.load_lora_weights(out): 0 means nothing was loaded (diffusers#9950), fewer than the file's keys
    means a partial load. With `adapter_name`, only that adapter's (diffusers names them default_0, ...)."""
    n = 0
    for name, _ in _transformer(pipeline_or_transformer).named_parameters():
        for t in LORA_TENSORS:
            if t in name and (adapter_name is None or f"{t}{adapter_name}." in name):
                n += 1
                break
    return n


def check_loaded(pipeline_or_transformer, adapter_state: dict, adapter_name: str | None = None) -> float:
    """Refuse unless every tensor of `adapter_state` (peft keys, `transformer.` prefix optional) is in the
    transformer's adapter with the same shape; returns the largest absolute difference of the values."""
    from peft import get_peft_model_state_dict

    model = _transformer(pipeline_or_transformer)
    names = list(getattr(model, "peft_config", {}) or {})
    if adapter_name is None:
        if len(names) != 1:
            raise CheckpointError(f"the transformer holds {len(names)} adapters ({names}); name the one to check")
        adapter_name = names[0]
    elif adapter_name not in names:
        raise CheckpointError(f"the transformer has no adapter {adapter_name!r} (it has {names})")
    loaded = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = _strip_prefix(adapter_state)
    missing = [k for k in state if k not in loaded or loaded[k].shape != state[k].shape]
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(state)} adapter tensor(s) were not loaded into adapter "
                              f"{adapter_name!r} (first {missing[0]!r}); it holds {len(loaded)}")
    return max((loaded[k].float() - state[k].detach().float().to(loaded[k].device)).abs().max().item()
               for k in state)
