"""The MMDiT: diffusers' SD3Transformer2DModel, from a size preset or a local diffusers folder.

Presets give the transformer's own shape; the input/output channels and the text widths are
taken from the VAE and the text encoders so the three always fit together. The model code does
not know about distribution: DeepSpeed wraps it in t2i/train/engine.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import SD3Transformer2DModel

from t2i.config import ModelConfig
from t2i.errors import ConfigError
from t2i.models.attention import force_backend
from t2i.models.presets import PRESETS
from t2i.sd3_folder import LAYOUT, is_placeholder, placeholder_message


def preset_kwargs(cfg: ModelConfig, *, in_channels: int, sample_size: int, joint_attention_dim: int,
                  pooled_projection_dim: int) -> dict:
    """The SD3Transformer2DModel constructor arguments for a preset plus the config's overrides."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    kwargs = dict(PRESETS[cfg.preset], sample_size=sample_size, in_channels=in_channels,
                  out_channels=in_channels, joint_attention_dim=joint_attention_dim,
                  pooled_projection_dim=pooled_projection_dim)
    kwargs.update(cfg.kwargs)
    kwargs.setdefault("pos_embed_max_size", sample_size // kwargs["patch_size"])
    return kwargs


def build_model(cfg: ModelConfig, *, in_channels: int, sample_size: int, joint_attention_dim: int,
                pooled_projection_dim: int, seed: int = 0, n_shapes: int = 1) -> SD3Transformer2DModel:
    """A randomly initialised preset (deterministic in `seed`) or a local pretrained folder. `n_shapes`: the
    number of latent shapes the model will see (the number of `data.buckets`), for `model.compile`."""
    if cfg.pretrained:
        model = load_pretrained(cfg.pretrained)
        check_compatible(model, in_channels=in_channels, joint_attention_dim=joint_attention_dim,
                         pooled_projection_dim=pooled_projection_dim)
    else:
        kwargs = preset_kwargs(cfg, in_channels=in_channels, sample_size=sample_size,
                               joint_attention_dim=joint_attention_dim,
                               pooled_projection_dim=pooled_projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SD3Transformer2DModel(**kwargs)
            init_from_scratch(model)
    force_backend(model, cfg.attention_backend)
    enable_checkpointing(model, cfg.gradient_checkpointing, cfg.attention_backend)
    if cfg.compile:
        compile_model(model, n_shapes=n_shapes)
    return model


def checkpointed_blocks(num_blocks: int, every: bool | int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward: all (true / 1), every k-th
    from the first (k: 0, k, 2k, ...), or none (false / 0)."""
    k = int(every) if not isinstance(every, bool) else (1 if every else 0)
    return list(range(0, num_blocks, k)) if k else []


def enable_checkpointing(model: SD3Transformer2DModel, every: bool | int, attention_backend: str = "auto") -> list[int]:
    """Selective activation checkpointing through diffusers' own switch (`enable_gradient_checkpointing`
    with a checkpoint function): the chosen blocks run under torch.utils.checkpoint (non-reentrant), the
    others keep their activations. Checkpointing every k-th block trades 1/k of the recomputation for
    (1 - 1/k) of the blocks' activation memory, so a batch that does not fit without checkpointing may fit
    with k = 2 or 3 at a fraction of full checkpointing's ~33 % extra compute. Returns the indices."""
    chosen = checkpointed_blocks(len(model.transformer_blocks), every)
    if not chosen:
        return chosen
    ids = {id(model.transformer_blocks[i]) for i in chosen}
    context_fn = attention_context_fn(attention_backend)

    def checkpoint(block, *args):
        if id(block) not in ids:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context_fn)

    model.enable_gradient_checkpointing(checkpoint)
    return chosen


def attention_context_fn(backend: str):
    from t2i.models.attention import context_fn
    return torch.utils.checkpoint.noop_context_fn if backend == "auto" else context_fn(backend)


# The modules outside the transformer blocks with elementwise work over every image token to fuse: the
# patch embedding's position add and the final adaLN (layer norm + modulation). The others are one GEMM
# (caption projection, output projection) or per-sample vectors (timestep + pooled-text embedder), where
# compile has nothing to fuse (and inductor's CPU bf16 code for the embedder's backward does not build in
# torch 2.14).
OUTSIDE_BLOCKS = ("pos_embed", "norm_out")


def compile_model(model: SD3Transformer2DModel, n_shapes: int = 1, *, backend: str = "inductor") -> None:
    """torch.compile every transformer block whole (its adaLN-Zero modulation, layer norms, QK RMS-norm,
    joint attention and MLPs are one graph; tests/test_speed_keys.py checks there is no graph break) and
    the position embedding and final adaLN outside them, in place (torchtitan's per-block recipe). Blocks of the same kind share compiled
    code, so compile time stays that of ~3 blocks (plain, dual-attention, last), and the module tree, its
    state-dict keys and DeepSpeed's hooks on it are unchanged. Compiling the top-level forward instead
    would trace through DeepSpeed's ZeRO-3 parameter hooks.

    `n_shapes` > 1 (aspect-ratio buckets: that many latent shapes): static graphs (`dynamic=False`), one per
    shape and kind of module, compiled on the shape's first batch, and Dynamo's recompile limits raised to
    `recompile_budget` (never lowered) so that no bucket falls back to eager; the recompiles are then bounded
    by the buckets (tests/test_compile_shapes.py). `n_shapes` == 1: torch's defaults, as before. `backend`:
    torch.compile's (tests use "eager" / "aot_eager")."""
    kwargs = {} if n_shapes <= 1 else {"dynamic": False}
    if backend != "inductor":
        kwargs["backend"] = backend
    modules = [*model.transformer_blocks, *(getattr(model, name) for name in OUTSIDE_BLOCKS)]
    if n_shapes > 1:
        raise_recompile_limits(recompile_budget(n_shapes, max_kinds(modules)))
    for module in modules:
        module.compile(**kwargs)


# Dynamo keeps its compiled graphs per code object, not per module: all the transformer blocks share
# JointTransformerBlock.forward's cache, one entry per (kind of block, latent shape, grad mode / train-eval
# mode), with no per-instance guard (torch 2.14 inlines nn.Modules, their parameters are graph inputs), and
# `recompile_limit` (default 8) counts all of them: 3 kinds of block x 3 buckets already reach it, after
# which a new shape runs eagerly. Hence the budget per kind.
def recompile_budget(n_shapes: int, kinds: int = 1) -> int:
    """Cache entries one compiled code object may need: for each kind of module sharing it, every bucket in
    training and once more in no-grad evaluation (the validation loss), plus 2 spare shapes (e.g. a
    sampling batch)."""
    return kinds * (2 * n_shapes + 2)


def max_kinds(modules) -> int:
    """The most modules of distinct structure (`structure_key`) that share one forward code object; modules of
    one structure share their compiled graphs."""
    kinds: dict = {}
    for module in modules:
        kinds.setdefault(type(module).forward.__code__, set()).add(structure_key(module))
    return max((len(k) for k in kinds.values()), default=1)


_PLAIN = (bool, int, float, str, type(None))


def structure_key(module: torch.nn.Module) -> tuple:
    """What Dynamo specialises a module's graph on, approximately: every submodule's type, its plain attributes
    (flags, sizes) and the kinds of its other attributes (e.g. the attention processor), and its parameters'
    shapes and dtypes. Two blocks with one key trace to the same graph; distinct keys count as distinct
    graphs (an overestimate at worst, which only raises the limit)."""
    def plain(v):
        return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(e, _PLAIN) for e in v))

    key = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, v if plain(v) else type(v).__qualname__) for k, v in vars(m).items()
                             if (plain(v) or not k.startswith("_")) and not isinstance(v, torch.Tensor)))
        params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters(recurse=False))
        key.append((name, type(m).__qualname__, attrs, params))
    return tuple(key)


def raise_recompile_limits(limit: int) -> None:
    """Raise Dynamo's per-code-object recompile limit (`recompile_limit`, `cache_size_limit` before torch 2.6)
    and its total-per-code-object cap (`accumulated_...`) to at least `limit`; never lowers them."""
    import torch._dynamo.config as dynamo_config

    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is not None and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


class ShapeWatch:
    """Notes each latent shape's first batch under model.compile (that batch compiles new graphs) for the log:
    `see(latent.shape)` returns a one-line message the first time a (height, width) comes, None after."""

    def __init__(self, n_expected: int):
        self.n_expected = n_expected
        self.seen: list[tuple[int, int]] = []

    def see(self, latent_shape, label: str = "") -> str | None:
        """`label`: what the shape is to the user, e.g. "bucket 1216x832" (width x height in pixels)."""
        height, width = (int(d) for d in tuple(latent_shape)[-2:])
        if (height, width) in self.seen:
            return None
        self.seen.append((height, width))
        k, n = len(self.seen), self.n_expected
        what = f"{label}, latent {height}x{width} (height x width)" if label else f"latent {height}x{width}"
        if k <= n:
            return f"model.compile: first batch at {what} (bucket {k} of {n}): compiling for it"
        return (f"model.compile: first batch at {what} (shape {k}, more than the {n} buckets "
                f"expected): compiling for it; past torch._dynamo's recompile limit a shape runs eagerly")


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (all torch.compile'd code, the loss parts included; one
    per module kind and new shape under model.compile). A process-wide count: compare two readings."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def init_from_scratch(model: SD3Transformer2DModel) -> None:
    """The DiT / SD3-reference initialisation, which diffusers' constructor does not apply: Xavier-
    uniform linear layers (the patch projection viewed as one), zero biases, and zero-initialised
    adaLN modulations and output projection, so every block starts as the identity ("adaLN-Zero")."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    torch.nn.init.zeros_(proj.bias)
    for name, module in model.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear")) or name in ("norm_out.linear", "proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def is_diffusers_folder(path: str) -> bool:
    root = Path(path)
    return (root / "transformer" / "config.json").is_file() or (root / "config.json").is_file()


def load_pretrained(path: str) -> SD3Transformer2DModel:
    """Load from a diffusers pipeline folder (uses its transformer/) or a transformer folder."""
    if is_placeholder(path):
        raise ConfigError(placeholder_message("model.pretrained", path))
    root = Path(path)
    if (root / "transformer" / "config.json").is_file():
        root = root / "transformer"
    if not (root / "config.json").is_file():
        raise ConfigError(f"model.pretrained={path}: not a diffusers folder (no transformer/config.json (MMDiT) or "
                          f"config.json in {path}); an SD3/SD3.5 folder has {LAYOUT}")
    return SD3Transformer2DModel.from_pretrained(root, local_files_only=True)


def check_compatible(model: SD3Transformer2DModel, *, in_channels: int, joint_attention_dim: int,
                     pooled_projection_dim: int) -> None:
    got = model.config
    want = dict(in_channels=in_channels, joint_attention_dim=joint_attention_dim,
                pooled_projection_dim=pooled_projection_dim)
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        detail = ", ".join(f"{k}: model has {m}, pipeline needs {n}" for k, (m, n) in bad.items())
        raise ConfigError(f"model.pretrained does not fit the configured VAE/text encoders ({detail})")


def velocity(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """v̂ = model(x, timestep, text): the one place that knows the SD3 forward signature.

    The timestep (1000·σ) is handed on in float32 whatever x's dtype, as diffusers' pipelines do (the
    transformer builds its sinusoidal embedding in fp32); a caller that rounds it to bf16 first has
    already lost precision (750 -> 752), so pass it in float32."""
    return model(hidden_states=x, timestep=timestep.float(), encoder_hidden_states=cond["context"],
                 pooled_projections=cond["pooled"], return_dict=False)[0]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load consolidated weights: every parameter must be present; buffers (e.g. the fixed sin-cos
    position table) may be absent, they are rebuilt by the constructor."""
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(params - set(weights))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False)
