"""Typed configuration: YAML files -> nested dataclasses, with `a.b=value` overrides.

Every section is a dataclass whose defaults *are* the embedded tiny CPU config
(`configs/tiny-cpu.yaml` spells the same values out). Loading is strict:

* an unknown key fails with its dotted name and the closest valid key;
* a value of the wrong type fails with the key and the expected type;
* the resolved config (defaults + file + overrides) is written into every run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from t2i.ds_keys import check_extra
from t2i.errors import ConfigError
from t2i.sd3_folder import (check_config as check_folders, implied_by_pretrained, is_placeholder,
                            placeholder_message, placeholders)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny-cpu.yaml"


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


TEXT_PRESETS = ("tiny", "sd3")
T5_PADDING = ("keep", "zero")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name: t2i.models.text_encoders.DTYPES


@dataclass
class TextEncoderConfig:
    """Which frozen text encoders to build. Defaults are the tiny CPU preset; for SD3 / SD3.5 set
    ``preset: sd3``, ``sd3_folder``, ``clip_context: 77`` and ``max_t5_tokens: 256`` (pipeline default)."""
    preset: str = "tiny"                # "tiny" (random init, offline) | "sd3" (local weights below)
    sd3_folder: Optional[str] = None    # diffusers SD3/SD3.5 folder: text_encoder{,_2,_3}, tokenizer{,_2,_3}
    clip_l: Optional[str] = None        # open_clip state dict for ViT-L-14 (quick_gelu, OpenAI); overrides folder
    clip_g: Optional[str] = None        # open_clip state dict for ViT-bigG-14; overrides folder
    t5: Optional[str] = None            # transformers folder with a T5EncoderModel + its tokenizer
    max_t5_tokens: Optional[int] = None  # T5 tokens; unset: 64 for tiny, 256 for sd3 (the SD3 pipeline's)
    clip_context: int = 32              # CLIP tokens; must be 77 for real CLIP weights
    dropout_all: float = 0.0            # per sample: drop ALL text together (CFG's unconditional input) ...
    dropout_clip_l: float = 0.0         # ... otherwise drop each encoder independently with its probability;
    dropout_clip_g: float = 0.0         # P(no text) = all + (1 - all)*clip_l*clip_g*t5 (t2i.caption_dropout,
    dropout_t5: float = 0.0             # docs/design/flow.md §5.1)
    dtype: str = "float32"              # float32 | bfloat16 | float16
    seed: int = 0                       # init seed of the tiny random towers (same on every rank)
    t5_padding: str = "keep"            # keep: T5 outputs at pad positions as the SD3 pipeline leaves them
                                        # (no attention mask); zero: outputs after the first </s> set to 0
                                        # (SimpleTuner's t5_padding=zero; lets t2i cache store T5 trimmed)

    def __post_init__(self):
        if self.max_t5_tokens is None:
            self.max_t5_tokens = 256 if self.preset == "sd3" else 64

    def validate(self) -> "TextEncoderConfig":
        """Raise ValueError naming the offending key."""
        if self.preset not in TEXT_PRESETS:
            raise ValueError(f"preset: {self.preset!r} is not one of {TEXT_PRESETS}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {DTYPE_NAMES}")
        if self.t5_padding not in T5_PADDING:
            raise ValueError(f"t5_padding: {self.t5_padding!r} is not one of {T5_PADDING}")
        for key in ("max_t5_tokens", "clip_context"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 2:
                raise ValueError(f"{key}: must be an integer >= 2, got {getattr(self, key)!r}")
        for key in ("dropout_all", "dropout_clip_l", "dropout_clip_g", "dropout_t5"):
            p = getattr(self, key)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{key}: caption dropout probability must be in [0, 1], got {p!r}")
        if self.preset == "tiny":
            for key in ("sd3_folder", "clip_l", "clip_g", "t5"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only used by preset 'sd3' (preset is 'tiny')")
        else:
            for key in ("clip_l", "clip_g", "t5"):
                if getattr(self, key) is None and self.sd3_folder is None:
                    raise ValueError(f"{key}: preset 'sd3' needs sd3_folder or an explicit {key} path")
        for key in ("sd3_folder", "clip_l", "clip_g", "t5"):
            path = getattr(self, key)
            if path is not None and not is_placeholder(path) and not os.path.exists(path):
                raise ValueError(f"{key}: path does not exist: {path}")
        return self


@dataclass
class RunConfig:
    name: str = "tiny-cpu"          # run folder = <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0                   # model init, data order, noise: everything derives from it


ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # t2i.models.attention


@dataclass
class ModelConfig:
    preset: str = "tiny"            # tiny | sd3-medium | sd3.5-medium | sd3.5-large (see t2i/models/mmdit.py)
    pretrained: Optional[str] = None  # local diffusers folder (a pipeline folder or its transformer/)
    gradient_checkpointing: Union[bool, int] = False  # true: every block | k: blocks 0, k, 2k, ... (selective;
                                    # recomputes 1/k of the blocks) | false: none
    compile: bool = False           # torch.compile each whole transformer block (adaLN, norms, QK-norm, attention,
                                    # MLP), the patch embedding, final adaLN and the loss (t2i/models/mmdit.py)
    attention_backend: str = "auto"  # SDPA kernel: auto (torch picks) | flash | cudnn | efficient | math
    kwargs: dict = field(default_factory=dict)  # extra SD3Transformer2DModel arguments over the preset


@dataclass
class VAEConfig:
    kind: str = "identity"          # identity (pixel space) | tiny (random AutoencoderKL) | pretrained
    path: Optional[str] = None      # local diffusers folder for kind=pretrained (a pipeline folder or its vae/)
    latent_channels: int = 16       # tiny only (SD3's VAE has 16)


@dataclass
class DataConfig:
    shards: Union[str, list] = "data/shapes/shapes-{000000..000007}.tar"  # brace pattern, list, dir, list file, pipe:
    resolution: int = 32            # without buckets: images are resized (short side) and centre-cropped to this
                                    # square. With buckets: the side of the model's square sample_size (a
                                    # from-scratch model; its positional grid also covers the largest bucket),
                                    # the default sampling size and, for a rule without `area`, area = resolution²
    buckets: Optional[Union[dict, list]] = None  # aspect-ratio buckets (t2i.buckets, docs/design/buckets.md):
                                    # null = the square above | {area, step, min_aspect, max_aspect} |
                                    # ["1024x1024", "1216x832", ...] (width x height)
    shuffle_buffer: int = 256
    num_workers: int = 0            # DataLoader workers per rank
    max_bad_fraction: float = 0.05  # fail when more than this fraction of samples is bad ...
    bad_check_after: int = 200      # ... once this many samples have been read on a rank
    cache: Optional[str] = None     # folder written by `t2i cache`: read <shard>.safetensors (text encodings +
                                    # VAE posteriors) instead of decoding images; a stale cache is refused
    max_caption_bytes: int = 2048   # captions are cut to this many UTF-8 bytes before tokenizing (counted)
    max_image_pixels: int = 40_000_000  # an image with more pixels (width x height) is a bad sample, not decoded
    min_size: int = 0               # an image whose short side is below this is a bad sample ("small");
                                    # 0 = any size (smaller images are upscaled to data.resolution)
    allow_pipe_in_lists: bool = False  # run `pipe:` lines found in a list file of shard names (a file is data:
                                    # off by default; `pipe:` given directly in the config always runs)


@dataclass
class TimestepConfig:
    kind: str = "auto"              # auto | uniform | logit_normal | mode | mixflow (t2i.flow.sample_sigmas);
                                    # auto = logit_normal for flow matching, MixFlow's Beta(2,1) for mixflow
    mean: float = 0.0               # logit_normal
    std: float = 1.0                # logit_normal
    scale: float = 1.29             # mode
    shift: float = 1.0              # s*sigma / (1 + (s-1)*sigma) after sampling; SD3 uses 3.0


@dataclass
class TrainConfig:
    objective: str = "flow_matching"  # flow_matching | mixflow: THE switch for MixFlow post-training
    mixflow_gamma: float = 0.8      # MixFlow mixture range coefficient γ in [0, 1] (objective=mixflow)
    init_from: Optional[str] = None  # start from a checkpoint (run folder, checkpoints/ or a tag) or a
                                    # diffusers folder: fresh optimizer and step counter, parent recorded
    init_weights: str = "ema"       # ema | raw: which weights of a checkpoint init_from takes
    stage: str = "auto"             # auto | pretrain | mixflow | control; auto derives it from
                                    # objective and init_from; an explicit stage must agree with them
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    steps: int = 900                # optimizer steps
    micro_batch_size: int = 32      # per rank
    grad_accum: int = 1
    lr: float = 3.0e-3
    schedule: str = "cosine"        # constant | cosine (after linear warm-up)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of lr
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    max_consecutive_nonfinite: int = 3  # non-finite loss/grad steps are skipped; this many in a row stop the run
    ckpt_every: int = 300
    keep_last: int = 3              # keep the newest N complete checkpoints (+ the one `latest` names); 0 = all
    log_every: int = 0              # a log line (+ sigma-bin losses) every N steps; 0 = auto: min(25, steps // 10),
                                    # so a short run still logs ~10 times (log_interval)


OPTIMIZER_KINDS = ("adamw", "deepspeed_adam", "cpu_adam", "adamw_8bit")  # t2i.train.optim
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimizerConfig:
    """Which AdamW implementation updates the weights (t2i/train/optim.py). The hyperparameters stay in
    train.* (lr and its schedule, betas, weight_decay): every kind here is the same AdamW update."""
    kind: str = "adamw"             # adamw: torch.optim.AdamW | deepspeed_adam: DeepSpeed's FusedAdam |
                                    # cpu_adam: DeepSpeedCPUAdam + ZeRO-Offload (optimizer state and step on
                                    # the CPU, for GPUs short of memory) | adamw_8bit: bitsandbytes AdamW8bit
    implementation: str = "auto"    # adamw only: auto (fused where torch has it: CUDA, CPU) | fused | foreach |
                                    # for_loop
    eps: float = 1.0e-8
    offload_pin_memory: bool = True  # cpu_adam: page-locked CPU buffers for the gradient/weight copies


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2             # 1 | 2 | 3
    precision: str = "fp32"         # fp32 | bf16 (bf16 on GPU)
    # Communication (docs/performance.md §5 has the measurements and DeepSpeed's guidance behind the defaults)
    overlap_comm: bool = True       # reduce gradient buckets on a side stream while backward runs (CUDA)
    contiguous_gradients: Optional[bool] = None  # copy gradients into one buffer as they are produced (less
                                    # fragmentation); null: on with CUDA, off on the CPU (3.5 % less CPU per step)
    reduce_bucket_size: int = 50_000_000     # elements per gradient reduction (ZeRO-1/2/3)
    allgather_bucket_size: int = 50_000_000  # elements per weight all-gather after the step (ZeRO-1/2)
    zero_hpz_partition_size: int = 1  # ZeRO-3 hpZ (ZeRO++): a secondary weight copy sharded over this many
                                    # ranks (the GPUs of a node), so backward all-gathers stay in the node
    zero_quantized_weights: bool = False    # ZeRO-3 qwZ (ZeRO++): int8 weight all-gathers (CUDA)
    zero_quantized_gradients: bool = False  # ZeRO-3 qgZ (ZeRO++): int4/8 gradient reduce-scatter (CUDA)
    overflow_check: str = "grad_norm"  # bf16 ZeRO-1/2: grad_norm (a non-finite gradient norm skips the step) |
                                    # per_tensor (DeepSpeed's extra inf/NaN pass over every gradient first)
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed JSON config; a key t2i
                                    # already sets from a typed key is refused (t2i.train.engine)


@dataclass
class ValidationConfig:
    """Fixed-σ validation loss on held-out shards: the same samples, noise and σ grid every time, so
    two checkpoints (or a MixFlow and a control run) are directly comparable."""
    shards: Optional[Union[str, list]] = None  # held-out shards; null disables validation
    every: int = 100                # steps; 0 = only at the last step
    num_samples: int = 64           # the first N samples of the shards, in file order
    num_sigmas: int = 8             # σ_i = (i + 0.5) / num_sigmas
    seed: int = 1234                # noise
    batch_size: int = 64


@dataclass
class LoggingConfig:
    wandb: str = "offline"          # offline | online | disabled
    project: str = "t2i"
    sample_keys: bool = False       # write each rank's per-step sample keys (resume tests, debugging)
    sigma_bins: int = 10            # training loss is also reported per σ bin of this many equal bins
    phase_times: bool = False       # per-step time in data/encode/forward/backward/step/ema/comm + peak memory
                                    # in metrics.jsonl (syncs the GPU at phase boundaries: a few % slower)


@dataclass
class SampleConfig:
    prompts: list = field(default_factory=lambda: [
        "a photo of a red circle",
        "a photo of a blue square",
        "a photo of a green triangle",
        "a photo of a yellow circle and a purple square",
        "a photo of three orange triangles",
        "a photo of a red square left of a blue circle",
        "a photo of two green circles",
        "a photo of a purple triangle above a yellow square",
    ])
    steps: int = 30
    guidance: float = 3.0
    guidance_interval: list = field(default_factory=lambda: [0.0, 0.4])  # [σ_lo, σ_hi]: CFG only for σ in it
    shift: float = 1.0
    sigmas: str = "auto"            # inference σ grid: t2i = shift(linspace(1, 0, steps + 1)) | diffusers =
                                    # FlowMatchEulerDiscreteScheduler.set_timesteps(steps) | auto = diffusers for
                                    # SD3-family models (a preset other than tiny, or pretrained), t2i for the toy
    seed: int = 0
    use_ema: bool = True
    every: int = 0                  # also sample these prompts (EMA) every N training steps; 0 = at the end only
    geneval_per_tag: int = 0        # with `every`: shapes-domain GenEval on up to this many prompts per tag
    geneval_images: int = 2         # images per GenEval prompt


LORA_TARGETS = [  # = t2i.models.lora.DEFAULT_TARGETS (plain strings here; a test checks they agree)
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
]
LORA_INITS = (True, False, "gaussian", "orthogonal")  # = t2i.models.lora.INITS


@dataclass
class LoraConfig:
    """LoRA post-training (t2i/models/lora.py): rank 0 trains every weight (full fine-tuning); rank > 0 trains
    only low-rank adapters on the transformer blocks' attention projections, the base weights frozen. The
    checkpoints then hold the adapters (+ their optimizer state and EMA) only; the base is reloaded from
    train.init_from / model.pretrained (or rebuilt from run.seed) on a resume and checked by content hash."""
    rank: int = 0                   # 0 = full fine-tuning; e.g. 16 for a LoRA
    alpha: Optional[float] = None   # the adapters' scale is alpha / rank; null = rank (scale 1)
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))  # Linear patterns in a transformer block
    blocks: Optional[list] = None   # block indices to adapt; null = all
    dropout: float = 0.0            # dropout on the adapters' input, in [0, 1)
    init: Union[str, bool] = "gaussian"  # gaussian | orthogonal | true (kaiming A) | false (random A and B)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> "Config":
        """Cross-field checks that a type system cannot express."""
        check_folders(self)  # the SD3 folders named, with the parts that will be read (t2i/sd3_folder.py)
        try:
            self.text.validate()
        except ValueError as e:
            raise ConfigError(f"text.{e}") from None
        _choice("model.preset", self.model.preset, ["tiny", "sd3-medium", "sd3.5-medium", "sd3.5-large"])
        _choice("vae.kind", self.vae.kind, ["identity", "tiny", "pretrained"])
        if self.vae.kind == "pretrained" and not self.vae.path:
            raise ConfigError("vae.kind=pretrained needs vae.path (a local diffusers folder)")
        _choice("train.objective", self.train.objective, ["flow_matching", "mixflow"])
        _choice("train.timesteps.kind", self.train.timesteps.kind,
                ["auto", "uniform", "logit_normal", "mode", "mixflow"])
        _choice("train.init_weights", self.train.init_weights, ["ema", "raw"])
        _choice("train.stage", self.train.stage, ["auto", "pretrain", "mixflow", "control"])
        t = self.train
        if t.objective == "mixflow" and t.timesteps.kind not in ("auto", "mixflow"):
            raise ConfigError(
                f"train.objective=mixflow draws its own timesteps (sigma = 1 - sqrt(u), i.e. Beta(2,1) in the "
                f"paper's time, then train.timesteps.shift), so train.timesteps.kind={t.timesteps.kind!r} would "
                f"be ignored; set train.timesteps.kind to 'auto' or 'mixflow'")
        if t.stage != "auto" and t.stage != self.stage:
            raise ConfigError(f"train.stage={t.stage!r} contradicts train.objective={t.objective!r} and "
                              f"train.init_from={t.init_from!r} (which make it {self.stage!r}); "
                              f"mixflow and control post-train from train.init_from")
        _choice("train.schedule", self.train.schedule, ["constant", "cosine"])
        _choice("deepspeed.zero_stage", self.deepspeed.zero_stage, [1, 2, 3])
        _choice("deepspeed.precision", self.deepspeed.precision, ["fp32", "bf16"])
        _choice("logging.wandb", self.logging.wandb, ["offline", "online", "disabled"])
        _choice("sample.sigmas", self.sample.sigmas, ["auto", "t2i", "diffusers"])
        gi = self.sample.guidance_interval  # t2i.flow.check_interval's rule, without importing torch here
        if not (isinstance(gi, (list, tuple)) and len(gi) == 2 and all(isinstance(v, (int, float)) for v in gi)
                and 0 <= gi[0] <= gi[1] <= 1):
            raise ConfigError(f"sample.guidance_interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo <= "
                              f"sigma_hi <= 1 (CFG only for sigma in it; [0, 1] guides every step), got {gi!r}")
        if not 0.0 <= self.train.mixflow_gamma <= 1.0:
            raise ConfigError(f"train.mixflow_gamma must be in [0, 1], got {self.train.mixflow_gamma}")
        for key in ("steps", "micro_batch_size", "grad_accum", "ckpt_every"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")
        if self.train.keep_last < 0:
            raise ConfigError(f"train.keep_last must be >= 0 (0 keeps every checkpoint), got {self.train.keep_last}")
        for key in ("every", "geneval_per_tag"):
            if getattr(self.sample, key) < 0:
                raise ConfigError(f"sample.{key} must be >= 0, got {getattr(self.sample, key)}")
        if self.sample.geneval_images < 1:
            raise ConfigError(f"sample.geneval_images must be >= 1, got {self.sample.geneval_images}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        if len(self.train.betas) != 2:
            raise ConfigError(f"train.betas must be a list of two floats, got {self.train.betas}")
        if not 0.0 <= self.data.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.data.max_bad_fraction}")
        if self.data.resolution < 8:
            raise ConfigError(f"data.resolution must be >= 8, got {self.data.resolution}")
        from t2i.buckets import bucket_set  # plain Python: the form here, the model's limits in t2i.models.geometry
        bucket_set(self.data.buckets, self.data.resolution)
        _positive(self, "train.lr", "train.timesteps.shift", "train.timesteps.std", "sample.shift")
        _at_least(self, 0, "train.warmup_steps", "train.log_every", "train.weight_decay", "train.grad_clip",
                  "sample.guidance", "data.num_workers", "validation.every", "data.min_size")
        _at_least(self, 1, "train.max_consecutive_nonfinite", "sample.steps", "data.shuffle_buffer",
                  "data.bad_check_after", "data.max_caption_bytes", "data.max_image_pixels",
                  "validation.num_samples", "validation.num_sigmas", "validation.batch_size", "logging.sigma_bins")
        if not 0.0 <= self.train.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.train.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.train.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {self.train.betas}")
        _validate_performance(self)
        _validate_lora(self.lora)
        return self


    @property
    def stage(self) -> str:
        """pretrain (from scratch or a model preset), mixflow or control (post-training from init_from)."""
        if self.train.objective == "mixflow":
            return "mixflow"
        return "control" if self.train.init_from else "pretrain"

    @property
    def timestep_sampler(self) -> str:
        kind = self.train.timesteps.kind
        if kind != "auto":
            return kind
        return "mixflow" if self.train.objective == "mixflow" else "logit_normal"


def log_interval(train: TrainConfig) -> int:
    """Steps between log lines: train.log_every, or with 0 (auto) every 25 steps but at least ~10
    times per run (a 100-step MixFlow stage logs every 10 steps, a 20-step test every 2)."""
    return train.log_every or max(1, min(25, train.steps // 10))


def _validate_performance(cfg: "Config") -> None:
    """The optimizer, DeepSpeed communication and model speed keys (docs/performance.md)."""
    m, o, ds = cfg.model, cfg.optimizer, cfg.deepspeed
    if not isinstance(m.gradient_checkpointing, bool) and m.gradient_checkpointing < 0:
        raise ConfigError(f"model.gradient_checkpointing must be true, false or k >= 0 (every k-th block; 0 = none), "
                          f"got {m.gradient_checkpointing}")
    _choice("model.attention_backend", m.attention_backend, list(ATTENTION_BACKENDS))
    _choice("optimizer.kind", o.kind, list(OPTIMIZER_KINDS))
    _choice("optimizer.implementation", o.implementation, list(ADAMW_IMPLEMENTATIONS))
    if o.kind != "adamw" and o.implementation != "auto":
        raise ConfigError(f"optimizer.implementation={o.implementation!r} chooses among torch's AdamW code paths; "
                          f"optimizer.kind={o.kind!r} has its own kernel (leave implementation at 'auto')")
    _choice("deepspeed.overflow_check", ds.overflow_check, ["grad_norm", "per_tensor"])
    _positive(cfg, "optimizer.eps", "deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size",
              "deepspeed.zero_hpz_partition_size")
    check_extra(ds.extra)  # deepspeed.extra may not set what a typed key sets (t2i.ds_keys)
    zero3 = {"zero_hpz_partition_size": ds.zero_hpz_partition_size > 1,
             "zero_quantized_weights": ds.zero_quantized_weights,
             "zero_quantized_gradients": ds.zero_quantized_gradients}
    for key, used in zero3.items():
        if used and ds.zero_stage != 3:
            raise ConfigError(f"deepspeed.{key} is a ZeRO-3 (ZeRO++) setting; it needs deepspeed.zero_stage=3, "
                              f"got {ds.zero_stage}")


def _validate_lora(lo: LoraConfig) -> None:
    """lora.*: the rank (0 = off), alpha, init, dropout, and the targets' and blocks' form (their match
    against the model is checked when the adapters are applied). The rules are t2i.models.lora's
    (check_rank, INITS, its dropout and pattern checks), restated here: the config imports no model package
    (tests/test_layout.py); tests/test_lora_train.py checks that both agree."""
    if isinstance(lo.rank, bool) or not isinstance(lo.rank, int) or lo.rank < 0:
        raise ConfigError(f"lora.rank must be an integer >= 0 (0 = full fine-tuning, e.g. 16 for a LoRA), "
                          f"got {lo.rank!r}")
    if lo.alpha is not None and (isinstance(lo.alpha, bool) or not lo.alpha > 0):
        raise ConfigError(f"lora.alpha must be a positive number (the LoRA scale is alpha / rank; leave it unset "
                          f"for alpha = rank), got {lo.alpha!r}")
    if not any(lo.init is i if isinstance(i, bool) else lo.init == i for i in LORA_INITS):
        raise ConfigError(f"lora.init must be one of {list(LORA_INITS)} (peft's init_lora_weights that leave the "
                          f"base weights as they are), got {lo.init!r}")
    if isinstance(lo.dropout, bool) or not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout!r}")
    if not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise ConfigError(f"lora.targets must be a non-empty list of module patterns relative to a transformer "
                          f"block (e.g. attn.to_q, attn*.to_k), got {lo.targets!r}")
    if lo.blocks is not None and (not lo.blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0
                                                       for b in lo.blocks)):
        raise ConfigError(f"lora.blocks must be null (all blocks) or a non-empty list of block indices, "
                          f"got {lo.blocks!r}")


def _get(cfg: "Config", key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _positive(cfg: "Config", *keys: str) -> None:
    for key in keys:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)!r}")


def _at_least(cfg: "Config", low: int, *keys: str) -> None:
    for key in keys:
        if not _get(cfg, key) >= low:
            raise ConfigError(f"{key} must be >= {low}, got {_get(cfg, key)!r}")


def _choice(key: str, value: Any, allowed: list) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file (default: configs/tiny-cpu.yaml) <- `a.b=value` overrides <- what
    model.pretrained implies for the keys still unset (an SD3/SD3.5 folder: t2i/sd3_folder.py)."""
    return from_dict(_resolved_dict(path, overrides)[0])


def _resolved_dict(path, overrides) -> tuple[dict, list[str]]:
    data = read_yaml(Path(path) if path is not None else DEFAULT_CONFIG)
    user = copy.deepcopy(data) if path is not None else {}  # the embedded default file counts as defaults
    for item in overrides:
        apply_override(data, item)
        apply_override(user, item)
    return data, implied_by_pretrained(data, user)


def describe(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> str:
    """What `t2i config` prints: the resolved config as YAML, after comment lines saying what
    model.pretrained implied and which placeholder paths are left to fill in (training refuses them)."""
    data, implied = _resolved_dict(path, overrides)
    cfg = from_dict(data)
    lines = []
    if implied:
        lines.append(f"# model.pretrained implies (set any of them to override): {', '.join(implied)}")
    for key, value in placeholders(cfg):
        if key != "model.pretrained" and value == cfg.model.pretrained and f"{key}={value}" in implied:
            continue  # follows model.pretrained
        lines.append(f"# TO SET: {placeholder_message(key, value)} (training refuses it)")
    return "\n".join(lines + [yaml.safe_dump(to_dict(cfg), sort_keys=False)]).rstrip("\n") + "\n"


def read_yaml(path: Path, _chain: tuple = ()) -> dict:
    """A config file as a dict. `base: other.yaml` (relative to the file) is read first and this
    file's keys are merged over it, so a stage config only states what differs."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _chain:
        raise ConfigError(f"config 'base' chain loops: {' -> '.join(map(str, _chain + (path,)))}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_yaml(path.parent / base, _chain + (path.resolve(),)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain nested dict."""
    return _build(Config, data, "").validate()


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`x=3` is an int)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    from t2i.io import write_text
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        ftype = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys += valid_keys(ftype, name + ".")
    return keys


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(dotted))
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            kwargs[key] = _build(ftype, value if value is not None else {}, dotted + ".")
        else:
            kwargs[key] = _check_type(dotted, value, ftype)
    return cls(**kwargs)


def _unknown_key_message(dotted: str) -> str:
    candidates = valid_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
    if not close:  # a right leaf in the wrong section: match on the last component
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in candidates}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_match[0]]] if leaf_match else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}'{hint}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise _type_error(key, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, value, tp)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value
        if isinstance(value, str):  # YAML 1.1 reads `5e7` (DeepSpeed's bucket-size idiom) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _type_error(key, value, tp)
    if tp in (str, bool, list, dict):
        if isinstance(value, tp):
            return value
        raise _type_error(key, value, tp)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
