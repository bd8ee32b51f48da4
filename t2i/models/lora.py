"""LoRA on the MMDiT (post-training on a budget): low-rank adapters on the transformer blocks' attention
projections, through peft, with everything else frozen.

What is trained: for each targeted nn.Linear W (out x in) of a joint transformer block, peft adds
`lora_A` (rank x in) and `lora_B` (out x rank) and the layer computes W x + (alpha / rank) B A x. Only A and B
train (rank x (in + out) parameters a layer); the base weights, the blocks' MLPs, adaLN modulations and norms,
the embedders and the output projection stay frozen, and so do the text encoders and the VAE, which are not
part of the MMDiT at all.

Why these default targets (`DEFAULT_TARGETS`): they are diffusers' SD3 LoRA set (examples/dreambooth/
train_dreambooth_lora_sd3.py): the image stream's q, k, v and output projections and the text stream's
(`add_*_proj`, `to_add_out`; the last block has no `to_add_out`, its text stream ends after attention), so
an adapter trained here has the layout of the community's SD3 adapters and an export loads with diffusers'
`load_lora_weights` (keys prefixed `transformer.`). Attention is where image tokens read the caption, the
usual place for a prompt-following / style adapter; at rank 16 it is 0.5 % of SD3.5-medium (12 M of 2.24 B
parameters). diffusers' patterns miss SD3.5-medium's second, image-only attention (`attn2`, MMDiT-X, in its
first 13 blocks); it is added here (`attn2.*`). With the default list, patterns a model lacks (attn2 outside
SD3.5-medium) are skipped; in a list of one's own every pattern must match.

Patterns are relative to a transformer block (`attn.to_q`, fnmatch-style: `attn*.to_q` is both attentions'),
and only the nn.Linear layers inside `transformer_blocks.<i>.` can be targeted; `blocks` restricts the
adapters to some blocks. peft (`inject_adapter_in_model`, no PeftModel wrapper) builds the layers, so the
module tree stays the diffusers model's with each targeted Linear replaced by a peft `lora.Linear` holding it
as `base_layer`; `merge` folds the adapters in and puts the plain Linears back.

This module imports neither torch nor peft at import time (the config can read `DEFAULT_TARGETS` and
`check_rank` cheaply).
"""

from __future__ import annotations

import difflib
import fnmatch
import numbers
import re
from typing import TYPE_CHECKING, NamedTuple

from t2i.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",              # image stream (diffusers' SD3 set)
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",  # text stream (diffusers' SD3 set)
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",          # SD3.5-medium's second attention (MMDiT-X)
)

# Module-name prefixes of the frozen encoders (none is inside the MMDiT; a pattern naming one is a mistake).
FROZEN_PREFIXES = ("text_encoder", "clip", "t5", "vae", "tokenizer")

# peft's `init_lora_weights` values that keep the base weights as they are and start training from
# B = 0 (True, "gaussian"), from orthogonal factors with B A = 0 up to rounding ("orthogonal"), or from random
# A and B (False: not a no-op, for tests/debugging).
# The others ("pissa*", "olora", "corda", "loftq" rewrite the base weights; "eva" and "corda" need data;
# "mica" freezes B) would make the adapter not a plain delta on the released weights, which the export
# to diffusers assumes.
INITS = (True, False, "gaussian", "orthogonal")

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
ADAPTER_NAME = "default"  # peft's; the only adapter this module makes


class AdapterSize(NamedTuple):
    modules: int     # LoRA-adapted Linear layers
    parameters: int  # their A and B parameters: sum of rank * (in + out)


# ---------------------------------------------------------------------------------------------- checks

def check_rank(rank, key: str = "lora.rank", *, alpha=None, alpha_key: str | None = None) -> None:
    """A LoRA rank must be a positive integer, and alpha (None: = rank) positive. `key` names the rank's
    config key; alpha's is `alpha_key`, else `key`'s section + ".alpha"."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ConfigError(f"{key} must be a positive integer (the adapters' rank, e.g. 16), got {rank!r}")
    if alpha is not None:
        alpha_key = alpha_key or (key.rpartition(".")[0] + ".alpha" if "." in key else "alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
            raise ConfigError(f"{alpha_key} must be a positive number (the LoRA scale is alpha / rank; "
                              f"leave it unset for alpha = rank), got {alpha!r}")


def _check_init(init, key: str = "lora.init") -> None:
    if not any(init is i if isinstance(i, bool) else (isinstance(init, str) and init == i) for i in INITS):
        raise ConfigError(f"{key} must be one of {list(INITS)} (peft's init_lora_weights that leave the base "
                          f"weights as they are: true = kaiming A / zero B, \"gaussian\" = diffusers' SD3 script, "
                          f"\"orthogonal\", false = random A and B, not a no-op), got {init!r}")


def _check_dropout(dropout, key: str = "lora.dropout") -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ConfigError(f"{key} must be in [0, 1), got {dropout!r}")


def _block_linears(model) -> dict[int, dict[str, str]]:
    """{block index: {block-relative name: full name}} of the nn.Linear layers in transformer_blocks.<i>.
    A peft LoRA layer counts as the Linear it wraps; the modules inside it (base_layer, lora_A, ...) do not."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[int, dict[str, str]] = {i: {} for i in range(len(model.transformer_blocks))}
    tuner_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in tuner_prefixes):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
            linear = isinstance(module.get_base_layer(), torch.nn.Linear)
        else:
            linear = isinstance(module, torch.nn.Linear)
        m = _BLOCK.match(name)
        if linear and m:
            out[int(m.group(1))][m.group(2)] = name
    return out


def _check_blocks(blocks, n_blocks: int, key: str = "lora.blocks") -> list[int]:
    if blocks is None:
        return list(range(n_blocks))
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise ConfigError(f"{key} must be a list of block indices (0..{n_blocks - 1}) or null for all, got {blocks!r}")
    blocks = list(blocks)
    if not blocks:
        raise ConfigError(f"{key} is empty: list block indices (0..{n_blocks - 1}), or null for all blocks")
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_blocks]
    if bad:
        raise ConfigError(f"{key}: {bad} out of range; the model has {n_blocks} transformer blocks "
                          f"(indices 0..{n_blocks - 1})")
    return sorted(set(blocks))


def _patterns(targets, key: str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{key} must be a non-empty list of module patterns relative to a transformer block "
                          f"(e.g. attn.to_q, attn*.to_k), got {targets!r}")
    return targets


def _resolve(model, targets, blocks, key: str) -> list[str]:
    """Check the patterns and blocks against the model; the matched full names, in module order."""
    patterns = _patterns(targets, key)
    for pattern in patterns:
        if pattern.lower().startswith(FROZEN_PREFIXES):
            raise ConfigError(f"{key}: {pattern!r}: the text encoders and the VAE are frozen; LoRA trains the "
                              f"MMDiT only (patterns are relative to a transformer block, e.g. attn.to_q)")
    linears = _block_linears(model)
    chosen = _check_blocks(blocks, len(linears), key.rpartition(".")[0] + ".blocks" if "." in key else "blocks")
    defaults = tuple(patterns) == DEFAULT_TARGETS  # the defaults cover every SD3 variant: a missing attn2 is fine
    matched: set[str] = set()
    for pattern in patterns:
        hits = {full for i in chosen for rel, full in linears[i].items() if fnmatch.fnmatchcase(rel, pattern)}
        if not hits and not defaults:
            elsewhere = sorted(i for i, names in linears.items() if i not in chosen
                               and any(fnmatch.fnmatchcase(rel, pattern) for rel in names))
            if elsewhere:
                raise ConfigError(f"{key}: {pattern!r} matches no Linear layer in the chosen lora.blocks "
                                  f"{chosen} (it does in blocks {elsewhere})")
            names = sorted({rel for names in linears.values() for rel in names})
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.0)
            raise ConfigError(f"{key}: {pattern!r} matches no Linear layer of a transformer block (patterns are "
                              f"relative to a block, fnmatch-style); closest: {', '.join(close)}")
        matched |= hits
    if not matched:
        raise ConfigError(f"{key}: no Linear layer matched in blocks {chosen}")
    order = [full for i in chosen for full in linears[i].values()]
    return [name for name in order if name in matched]


def check_targets(model, targets=DEFAULT_TARGETS, blocks=None, key: str = "lora.targets") -> None:
    """ConfigError (naming `key`, or `lora.blocks`) for: a pattern naming a frozen encoder, a block index out of
    range, a pattern that matches no Linear in the chosen blocks (with the 3 closest block-relative names).
    With the default targets, patterns the model lacks (attn2 outside SD3.5-medium) are skipped."""
    _resolve(model, targets, blocks, key)


def target_names(model, targets=DEFAULT_TARGETS, blocks=None) -> list[str]:
    """The full module names (`transformer_blocks.<i>.attn.to_q`, ...) the patterns match in `blocks`
    (None: all; else a list of block indices), in module order. Checked as `check_targets`."""
    return _resolve(model, targets, blocks, "lora.targets")


def check_config(cfg) -> None:
    """A LoRA config's targets and blocks against its model, in the process the user started, before torchrun,
    DeepSpeed or any weight: the transformer is built on the meta device from model.pretrained's
    transformer/config.json, else from model.preset and model.kwargs (the module names depend on the layer count
    and the dual-attention blocks only, so the text and latent widths are placeholders). Nothing for rank 0."""
    if not cfg.lora.rank:
        return
    import torch
    from diffusers import SD3Transformer2DModel

    from t2i.models.geometry import folder_config
    from t2i.models.mmdit import preset_kwargs

    config = folder_config(cfg.model.pretrained, "transformer")
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config) if config else SD3Transformer2DModel(**preset_kwargs(
            cfg.model, in_channels=16, sample_size=64, joint_attention_dim=64, pooled_projection_dim=64))
    check_targets(model, cfg.lora.targets, cfg.lora.blocks)


# --------------------------------------------------------------------------------------------- adapters

def _tuner_layers(model) -> list[tuple[str, object]]:
    """The outermost peft tuner layers (name, module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, prefixes = [], []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(p) for p in prefixes):
            out.append((name, module))
            prefixes.append(name + ".")
    return out


def has_adapter(model) -> bool:
    return bool(_tuner_layers(model))


def apply(model, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, blocks=None,
          dropout: float = 0.0, init: bool | str = "gaussian") -> list[str]:
    """Inject LoRA adapters (peft's `inject_adapter_in_model`, in place) into the targeted Linears and freeze
    everything else; returns the adapted modules' full names.

    `alpha`: the scale is alpha / rank (None: alpha = rank, scale 1). `init` is peft's `init_lora_weights`,
    limited to those that leave the base weights alone (`INITS`): "gaussian" (A ~ N(0, 1/rank), B = 0; diffusers'
    SD3 LoRA script), True (peft's default: kaiming-uniform A, B = 0), "orthogonal" (orthogonal factors with
    B A = 0 up to rounding, ~1e-6; even rank), False (random A and B: not a no-op, for tests). With B = 0 the
    adapted model computes exactly what the base model does until the first update.

    The adapter weights take the base layer's device and dtype (peft moves them there): a bf16 base gives bf16
    A and B; cast them (or keep the base in fp32) if the optimizer should see fp32 weights."""
    import peft

    check_rank(rank, alpha=alpha)
    _check_dropout(dropout)
    _check_init(init)
    if has_adapter(model):
        raise ConfigError("the model already has LoRA adapters (lora.apply once per model; merge() first to stack)")
    names = target_names(model, targets, blocks)
    peft.inject_adapter_in_model(lora_config(rank, alpha, names, dropout, init), model, adapter_name=ADAPTER_NAME)
    adapted = [name for name, _ in _tuner_layers(model)]
    if sorted(adapted) != sorted(names):  # peft matches on name suffixes: make sure it took exactly ours
        raise RuntimeError(f"peft adapted {len(adapted)} modules, {len(names)} were targeted: "
                           f"{sorted(set(adapted) ^ set(names))[:5]}")
    trainable = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return names


def lora_config(rank: int, alpha: float | None, names: list[str], dropout: float = 0.0, init: bool | str = "gaussian"):
    """The peft LoraConfig of `apply`: the adapted modules by full name (what diffusers' loader matches)."""
    import peft

    return peft.LoraConfig(r=int(rank), lora_alpha=alpha or int(rank), target_modules=list(names),
                           lora_dropout=float(dropout), init_lora_weights=init)


def buffers_out_of_state_dict(model) -> list[str]:
    """Make every buffer of an adapted model non-persistent, so that state_dict() (and with it DeepSpeed's model
    file of a LoRA tag) holds the adapters only. The buffers belong to the base, which a LoRA run loads again
    from its folder on every start (SD3.5-medium's sin-cos positional table alone is 226 M elements, 0.9 GB in
    fp32: more than the rank-16 adapters with their optimizer state, and under ZeRO-3 every rank's model file
    would carry it). Returns the buffers' names."""
    names = []
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            if name not in module._non_persistent_buffers_set and module._buffers[name] is not None:
                module._non_persistent_buffers_set.add(name)
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def _is_adapter_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    """The adapters' parameters (every lora_A / lora_B weight), the ones to train."""
    return [p for name, p in model.named_parameters() if _is_adapter_name(name)]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights only (peft's `get_peft_model_state_dict`), keyed without peft's adapter name:
    `transformer_blocks.0.attn.to_q.lora_A.weight` (prefix `transformer.` for diffusers' LoRA files). The
    tensors share storage with the model, as `state_dict()` does."""
    from peft.utils import get_peft_model_state_dict

    if not has_adapter(model):
        raise ConfigError("the model has no LoRA adapters (lora.apply first)")
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def peft_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint's weights (named as the adapted model's parameters,
    `...to_q.lora_A.default.weight`), keyed as `adapter_state_dict` gives them (`...to_q.lora_A.weight`);
    base weights and buffers are left out."""
    marker = re.compile(rf"\.(lora_[AB])\.{ADAPTER_NAME}\.")
    return {marker.sub(r".\1.", name): t for name, t in weights.items() if marker.search(name)}


def load_adapter(model, state_dict: dict[str, torch.Tensor]) -> int:
    """Load adapter weights (as `adapter_state_dict` gives them) into a model adapted with the same targets and
    rank. Refuses (ConfigError) missing or unexpected keys and shape mismatches; returns the keys loaded."""
    from peft.utils import set_peft_model_state_dict

    want = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    if missing or unexpected:
        raise ConfigError(f"the adapter weights do not fit the model's LoRA layers (same lora.targets and "
                          f"lora.blocks?): {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                          f"{unexpected[:3]}")
    wrong = [(k, tuple(state_dict[k].shape), s) for k, s in want.items() if tuple(state_dict[k].shape) != s]
    if wrong:
        k, got, expected = wrong[0]
        raise ConfigError(f"the adapter weights have other shapes than the model's LoRA layers (same lora.rank?): "
                          f"{len(wrong)} differ, e.g. {k}: {list(got)} vs {list(expected)}")
    result = set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise ConfigError(f"peft did not load {len(result.unexpected_keys)} adapter keys, e.g. "
                          f"{result.unexpected_keys[:3]}")
    return len(state_dict)


def merge(model) -> list[str]:
    """Fold the adapters into the base weights (W += alpha/rank B A, peft's LoraLayer.merge with its non-finite
    check) and put each base Linear back in place of its LoRA layer, so the module tree and state-dict keys are
    the plain SD3Transformer2DModel's again (what peft's `merge_and_unload` does; with `inject_adapter_in_model`
    there is no PeftModel to call it on). Returns the merged modules' names. The weights keep their dtype (a
    bf16 base is rounded to bf16 after the fp32 sum) and their requires_grad (False after `apply`)."""
    merged = []
    for name, layer in _tuner_layers(model):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        merged.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return merged


# ------------------------------------------------------------------------------------------------- sizes

def adapter_size(model, rank: int, targets=DEFAULT_TARGETS, blocks=None) -> AdapterSize:
    """Modules and parameters (rank x (in + out) each) that `apply` would add, from the Linears' shapes."""
    modules = [model.get_submodule(name) for name in target_names(model, targets, blocks)]
    modules = [getattr(m, "base_layer", m) for m in modules]
    return AdapterSize(len(modules), sum(rank * (m.in_features + m.out_features) for m in modules))


def parameter_count(preset: str, rank: int = 16, targets=DEFAULT_TARGETS, blocks=None) -> AdapterSize:
    """The adapter size for a preset (`t2i.models.presets`), the model built on the meta device (no memory) with
    SD3's VAE and text widths (they do not change the blocks). At rank 16 with the default targets:
    sd3.5-medium 243 modules, 11,943,936 parameters; sd3.5-large 303 modules, 23,580,672."""
    import torch
    from diffusers import SD3Transformer2DModel

    from t2i.config import ModelConfig
    from t2i.models.mmdit import preset_kwargs

    check_rank(rank)
    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128,
                           joint_attention_dim=4096, pooled_projection_dim=2048)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    return adapter_size(model, rank, targets, blocks)
