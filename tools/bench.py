"""t2i bench: what one training step costs, phase by phase, and against simpler loops.

    t2i bench                                   # tiny config, 2 CPU ranks, every variant: table + bench.json
    t2i bench --variants t2i,bare --nproc 1 --steps 30 --shards 'data/mine/mine-{000000..000003}.tar'
    t2i bench --synthetic --preset sd3.5-medium --resolution 512 --precision bf16 \\
              --variants bare,zero2 --batch-size 16 --ckpt both --compile both        # a GPU (tools/gpu_bench.sh)

Variants, each in its own process group (so its peak memory is its own), same model init and seed:
  t2i          the real training step: pipelines.train.main with logging.phase_times (loader, frozen
               encoders, DeepSpeed at the config's ZeRO stage, EMA, logging); phases from metrics.jsonl
  mixflow      the same with train.objective=mixflow (the paper: "near-zero" extra cost)
  cache        the same reading the precomputed text + VAE cache of the shards (built first by `t2i cache`)
  zero1..3     DeepSpeed's step alone: t2i's loss on one fixed, pre-encoded batch (no data, encoders, EMA)
  ddp          torch DistributedDataParallel + AdamW, the same batch and loss
  bare         a plain PyTorch loop: the model, AdamW (fused where torch has it, as t2i's default), the
               flow-matching loss written out, no distribution; bf16 as diffusers' training examples do it
               (fp32 weights under autocast)
Data: --shards (or data.shards in --config / an override); with neither, the embedded default's
data/shapes/ shards, or when `make demo` has not written them a small shapes set made once in
~/.cache/t2i (tools/bench_data.py, announced in the log).
A variant may carry config overrides after `+`, to compare settings side by side in one run:
  t2i bench --variants t2i,t2i+optimizer.implementation=foreach,bare --repeats 3
  t2i bench --variants zero2,zero2+deepspeed.overlap_comm=false,zero2+deepspeed.reduce_bucket_size=5e8
--repeats N runs the whole list N times, round by round and rotated (A B C, B C A, C A B, ...), and
reports the median step time per variant with its spread and each ratio as the median of the per-round
ratios, so load from other jobs on the machine hits both sides of a ratio alike. A run's step time is its
median step; the CPU time per step (rank 0's process, all threads) is reported beside it: it is the
work, which other jobs on a shared machine do not stretch.
Printed: images/s, per-phase ms, peak memory per rank, achieved FLOP/s and MFU (t2i/models/flops.py has the
formula), the ratios t2i/bare (pipeline overhead), zeroK/ddp, mixflow/t2i, cache/t2i, and per variant the
SDPA kernel that ran and DeepSpeed's optimizer step by part (t2i/train/step_profile.py).
--synthetic replaces data and encoders by random latents and text states of the config's shapes
(SD3: 16 latent channels at 1/8 resolution, 77 + 256 tokens of width 4096, pooled 2048), so
full-size MMDiTs can be measured without their text encoders' weights; only model-step variants.
LoRA against full fine-tuning in one run (tools/bench_lora.py; every variant applies lora.rank > 0):
  t2i bench --in-process --repeats 3 --ckpt-bytes --variants zero2,zero2+lora.rank=16,t2i,t2i+lora.rank=16
adds the ratio LoRA / full, and a table of the trained parameters, the optimizer step and (--ckpt-bytes)
the bytes of one saved checkpoint tag per variant.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from t2i.cmdline import parser as make_parser
from t2i.errors import ConfigError
from t2i.io import write_json, write_jsonl, write_text
from tools import bench_lora

FULL = ("t2i", "mixflow", "cache")
_RUN_IDS = itertools.count()  # run folders of one worker process (--repeats, --in-process)
MODEL_ONLY = ("zero1", "zero2", "zero3", "ddp", "bare")
ALL = FULL + MODEL_ONLY
PHASES = ("data", "encode", "forward", "backward", "step", "ema", "loop", "comm")
# SD3 / SD3.5 conditioning shapes, for --synthetic with real-size presets.
SD3_SHAPES = {"latent_channels": 16, "downsample": 8, "context_dim": 4096, "pooled_dim": 2048,
              "clip_context": 77, "max_t5_tokens": 256}


def parse_args(argv):
    from t2i.cliargs import add_overrides_argument, parse_with_overrides

    p = make_parser("bench", __doc__)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny-cpu.yaml)")
    add_overrides_argument(p)
    p.add_argument("--shards", default=None,
                   help="your shards (any data.shards spec: brace range, glob, folder, list file); default: the "
                        "config's data.shards, or a cached shapes set when that is the missing default data/shapes/")
    p.add_argument("--variants", default=",".join(ALL),
                   help=f"comma list of {', '.join(ALL)}; each may add config overrides: t2i+key=value+key=value")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the variant list this many times, round by round; medians and spreads are reported")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per variant (torchrun; 1 = a plain process); default: the GPUs here, or 2 on a CPU")
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    p.add_argument("--batch-size", default=None,
                   help="micro-batch per rank (default: train.micro_batch_size); with --synthetic a comma list "
                        "is tried in order until one fits in memory")
    p.add_argument("--synthetic", action="store_true", help="random latents/text states; model-step variants only")
    p.add_argument("--preset", default=None, help="with --synthetic: model.preset (e.g. sd3.5-medium)")
    p.add_argument("--resolution", type=int, default=None, help="data.resolution")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="deepspeed.precision")
    p.add_argument("--ckpt", choices=["off", "on", "both"], default="off", help="activation checkpointing")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile per block")
    p.add_argument("--cache", default=None, help="cache folder for the `cache` variant (default: build one)")
    p.add_argument("--ckpt-bytes", action="store_true",
                   help="after its measured steps (first round), each DeepSpeed variant saves one checkpoint tag "
                        "(LoRA: the adapters only), reports its bytes and deletes it (tools/bench_lora.py)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and the variants' runs")
    p.add_argument("--in-process", action="store_true",
                   help="all variants in one process group (saves start-up; GPU peak memory is still per variant)")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which no further variant starts (for a lent GPU's fixed time)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: "variant:ckpt:compile;..."
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return parse_with_overrides(p, argv)


# ----------------------------------------------------------------------------------------------
# The orchestrator: one process group per variant, then the table
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    if args.nproc is None:
        import torch
        args.nproc = torch.cuda.device_count() or 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if base_variant(v) not in ALL]
    if bad:
        raise ConfigError(f"--variants: unknown {bad}; choose from {', '.join(ALL)} (optionally +key=value)")
    if args.synthetic and any(base_variant(v) in FULL for v in variants):
        raise ConfigError(f"--synthetic measures the model step only; drop "
                          f"{[v for v in variants if base_variant(v) in FULL]}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps < 2:  # step times are measured between consecutive steps' ends
        raise ConfigError(f"--steps must be >= 2 (times are measured between steps), got {args.steps}")
    if not args.synthetic:  # which shards: checked (or made) here, before any rank starts
        args.overrides = with_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results_file.unlink(missing_ok=True)
    if any(base_variant(v) == "cache" for v in variants) and not args.cache:
        args.cache = build_cache(args, out / "cache")
    # Round r starts at the r-th variant (A B C, B C A, C A B, ...): no variant always runs first or last.
    runs = [f"{v}:{int(ckpt)}:{int(comp)}:{r}" for r in range(args.repeats) for comp in _flags(args.compile)
            for ckpt in _flags(args.ckpt) for v in variants[r % len(variants):] + variants[:r % len(variants)]]
    report, failed = None, []
    for group in ([";".join(runs)] if args.in_process else runs):
        if args.deadline and time.time() > args.deadline:
            print(f"[bench] deadline passed: skipping {group}", flush=True)
            continue
        rc = launch(args, group, results_file)
        if rc != 0:
            failed.append(group)
            print(f"[bench] {group} failed with exit code {rc}", file=sys.stderr, flush=True)
        report = write_report(out, results_file, args)  # after every group: a cut-off run keeps its numbers
    report = write_report(out, results_file, args) if report is None else report
    print(report["markdown"])
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    if failed:  # the table has the others' numbers, but a failed variant is not a success
        print(f"[bench] {len(failed)} variant run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 0 if report["results"] and not failed else 1


def write_report(out: Path, results_file: Path, args) -> dict:
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    report = summarize(results, args)
    write_json(out / "bench.json", report, indent=1)  # atomically: a killed bench leaves the old report or the new
    write_text(out / "bench.md", report["markdown"])
    return report


def base_variant(spec: str) -> str:
    """`t2i+optimizer.implementation=foreach` -> `t2i`."""
    return spec.split("+", 1)[0]


def variant_overrides(spec: str) -> list[str]:
    """`t2i+a.b=1+c=2` -> ["a.b=1", "c=2"]: config overrides of one variant."""
    return [o for o in spec.split("+")[1:] if o]


def with_data(args) -> list[str]:
    """The overrides with `data.shards` set to the shards every variant reads (tools/bench_data.py): --shards,
    else the config's data.shards, else a cached shapes set when that is the default and missing."""
    from t2i.config import DataConfig, load_config
    from tools.bench_data import choose_shards

    cfg = load_config(args.config, args.overrides)
    spec, urls = choose_shards(args.shards, cfg.data.shards, default=DataConfig().shards,
                               log=lambda m: print(m, flush=True))
    print(f"[bench] data: {len(urls)} shard(s) from {spec if isinstance(spec, str) else '::'.join(spec)}", flush=True)
    if spec == cfg.data.shards:
        return list(args.overrides)
    return [*args.overrides, f"data.shards={json.dumps(spec)}"]  # JSON quoting is YAML: braces stay a string


def append_result(path, record: dict) -> None:
    """Add one run's record to results.jsonl: the whole file is rewritten atomically (a few lines), so a
    worker killed mid-write never leaves a torn last line for the summary to choke on."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    write_jsonl(path, [*rows, record])


def _flags(choice: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def launch(args, runs: str, results_file: Path) -> int:
    worker_args = [*(["--config", args.config] if args.config else []), "--worker", runs,
                   "--results", str(results_file), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--out", args.out, *_pass(args), *args.overrides]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "tools.bench", *worker_args]
    else:
        cmd = [sys.executable, "-m", "tools.bench", *worker_args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    return subprocess.call(cmd, env=env)


def _pass(args) -> list[str]:
    out = []
    for name in ("batch_size", "preset", "resolution", "precision", "cache", "peak_tflops", "deadline", "repeats"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--synthetic"] if args.synthetic else []) + (["--ckpt-bytes"] if args.ckpt_bytes else [])


def build_cache(args, folder: Path) -> str:
    """The `cache` variant's input: `t2i cache` over the config's shards (skips files already valid)."""
    cmd = [sys.executable, "-m", "t2i.cli", "cache", *(["--config", args.config] if args.config else []),
           "--out", str(folder), *args.overrides]
    print(f"[bench] building the cache: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return str(folder)


# ----------------------------------------------------------------------------------------------
# A worker: one variant under torchrun (or one process)
# ----------------------------------------------------------------------------------------------


def worker(args) -> int:
    from t2i.runtime import configure_environment
    configure_environment()
    import torch.distributed as dist

    from t2i.train import engine as engine_lib
    from t2i.config import load_config

    overrides = list(args.overrides)
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    if args.resolution:
        overrides.append(f"data.resolution={args.resolution}")
    if args.precision:
        overrides.append(f"deepspeed.precision={args.precision}")
    rank, world = engine_lib.init_distributed()
    for run in args.worker.split(";"):
        spec, ckpt, comp, repeat = run.rsplit(":", 3)
        variant = base_variant(spec)
        late = [bool(args.deadline and time.time() > args.deadline)]
        dist.broadcast_object_list(late, src=0)  # every rank takes the same decision
        if late[0]:
            if rank == 0:
                print(f"[bench] deadline passed: skipping {run}", flush=True)
            continue
        if rank == 0:
            print(f"[bench] {spec}  activation checkpointing {'on' if ckpt == '1' else 'off'}, "
                  f"compile {'on' if comp == '1' else 'off'}" + (f", round {int(repeat) + 1}" if args.repeats > 1
                                                                 else ""), flush=True)
        cfg = load_config(args.config, overrides + [f"model.gradient_checkpointing={ckpt == '1'}",
                                                    f"model.compile={comp == '1'}"] + variant_overrides(spec))
        save = bool(args.ckpt_bytes and repeat == "0")  # the tag's bytes: once per variant
        if variant in FULL:
            result = run_full(variant, cfg, args, rank, world, save=save)
        else:
            result = run_model_only(variant, cfg, args, rank, world, save=save, spec=spec)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0 and result is not None:
            merged = dict(gathered[0], peak_mem_gb_per_rank=[g["peak_mem_gb"] for g in gathered],
                          spec=spec, repeat=int(repeat))
            append_result(args.results, merged)
            write_report(Path(args.out), Path(args.results), args)  # after every variant: a cut-off keeps it
            print(f"[bench] {spec}: {merged['images_per_s']:.2f} images/s, micro-batch {merged['micro_batch']}, "
                  f"peak {max(merged['peak_mem_gb_per_rank']):.1f} GB"
                  + (f", MFU {100 * merged['mfu']:.1f} %" if merged.get("mfu") else ""), flush=True)
        dist.barrier()
    return 0


def attention_report(cfg, model_kwargs: dict, latent_size: int, text_tokens: int, device) -> dict:
    """The SDPA kernel this variant's attention runs (t2i.models.attention's start-up probe)."""
    import torch

    from t2i.models import attention

    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    probed = attention.probe(**attention.model_shape(model_kwargs, latent_size, text_tokens), dtype=dtype,
                             device=device)
    return {"kernel": attention.resolve(cfg.model.attention_backend, probed),
            "usable": [k for k, ok in probed["usable"].items() if ok], "torch_pick": probed["auto"]}


def _common(variant, cfg, args, world, micro_batch, flops_per_sample, step_times, phases, device,
            attention=None, cpu_times=None) -> dict:
    import torch

    from t2i.train.step_profile import breakdown

    from t2i.models.flops import peak_flops
    from t2i.train.timing import peak_memory_gb

    mean = statistics.fmean(step_times)
    images = micro_batch * cfg.train.grad_accum * world
    ips = images / mean
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    achieved = flops_per_sample * ips / world  # per rank (per GPU)
    return {"variant": variant, "ckpt": cfg.model.gradient_checkpointing, "compile": cfg.model.compile,
            "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
            "objective": cfg.train.objective, "world": world, "micro_batch": micro_batch,
            "resolution": cfg.data.resolution, "device": name,
            "preset": f"{Path(cfg.model.pretrained).name} (model.pretrained)" if cfg.model.pretrained
            else cfg.model.preset,
            "lora_rank": bench_lora.rank_of(cfg),
            "steps": len(step_times), "step_ms": 1e3 * mean, "step_ms_median": 1e3 * statistics.median(step_times),
            # CPU time of rank 0's process per step (all its threads): the work, unlike wall time not
            # stretched by other jobs on a shared machine (time blocked in a collective is not counted)
            "cpu_ms_median": 1e3 * statistics.median(cpu_times) if cpu_times else None,
            "images_per_s": ips, "images_per_s_per_rank": ips / world,
            "phases_ms": {k: 1e3 * v for k, v in phases.items() if k in PHASES},
            "optimizer_ms": {k: 1e3 * v for k, v in breakdown(phases).items()},
            "optimizer": cfg.optimizer.kind + ("" if cfg.optimizer.kind != "adamw" else
                                               f" ({optimizer_path(cfg, device)})"),
            "attention": attention,
            "train_flops_per_image": flops_per_sample, "achieved_tflops_per_rank": achieved / 1e12,
            "mfu": achieved / peak if peak else None, "peak_mem_gb": peak_memory_gb(device)}


def optimizer_path(cfg, device) -> str:
    from t2i.train.optim import implementation
    return implementation(cfg, device)


def run_full(variant: str, cfg, args, rank: int, world: int, save: bool = False) -> dict:
    """pipelines.train.main itself, with phase timings on; the numbers come from its metrics.jsonl. `save`: the
    run's Checkpointer saves its last step (after the measured ones) and the tag's bytes are reported."""
    from pipelines import train
    from t2i.train import engine as engine_lib
    from t2i.config import from_dict, to_dict
    from t2i.models.flops import train_flops_per_sample
    from t2i.models.mmdit import preset_kwargs
    from t2i.train.timing import peak_memory_gb

    d = to_dict(cfg)
    run_root = Path(args.out) / "runs"
    d["run"].update(output_dir=str(run_root), name=f"{variant}-{os.getpid() if rank == 0 else 0}-{next(_RUN_IDS)}")
    d["train"].update(steps=10**6, ckpt_every=10**6, log_every=10**6)  # no checkpoints, no σ-bin log line
    d["logging"].update(wandb="disabled", phase_times=True, sample_keys=False)
    d["sample"].update(every=0, geneval_per_tag=0)
    d["validation"].update(shards=None)
    if variant == "mixflow":
        d["train"].update(objective="mixflow")
        d["train"]["timesteps"].update(kind="auto")
    if variant == "cache":
        d["data"]["cache"] = args.cache
    if args.batch_size:
        d["train"]["micro_batch_size"] = int(args.batch_size.split(",")[0])
    import torch.distributed as dist
    name = [d["run"]["name"]]
    dist.broadcast_object_list(name, src=0)  # one run folder for all ranks
    d["run"]["name"] = name[0]
    run_cfg = from_dict(d).validate()
    run_dir = train.main(run_cfg, stop_at=args.warmup + args.steps, save_last=save)
    device = engine_lib.device()
    if rank != 0:  # metrics.jsonl is rank 0's; the other ranks report their peak memory only
        return {"peak_mem_gb": peak_memory_gb(device)}
    shapes, text_tokens = model_shapes(run_cfg)
    kw = bench_lora.pretrained_kwargs(run_cfg) or preset_kwargs(run_cfg.model, **shapes)
    flops = train_flops_per_sample(kw, shapes["sample_size"], text_tokens)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    measured = steps[args.warmup:]
    elapsed = [r["elapsed_s"] for r in steps]
    step_times = [b - a for a, b in zip(elapsed[args.warmup - 1:], elapsed[args.warmup:])]  # warmup >= 1
    cpu = [r["cpu_s"] for r in steps]
    cpu_times = [b - a for a, b in zip(cpu[args.warmup - 1:], cpu[args.warmup:])]
    keys = sorted({k for r in measured for k in r["time"]} | set(PHASES))
    phases = {k: statistics.fmean(r["time"].get(k, 0.0) for r in measured) for k in keys}
    result = _common(variant, run_cfg, args, world, run_cfg.train.micro_batch_size, flops, step_times, phases, device,
                     attention_report(run_cfg, kw, shapes["sample_size"], text_tokens, device), cpu_times)
    return dict(result, **bench_lora.meta_counts(run_cfg, shapes),
                ckpt_bytes=bench_lora.measure_run_tag(run_dir) if save else None)


def run_model_only(variant: str, cfg, args, rank: int, world: int, save: bool = False, spec: str = "") -> dict | None:
    """One fixed batch; the chosen loop; batch sizes tried in order until one fits in memory. `save`: DeepSpeed
    variants save one tag after the measured steps and report its bytes (tools/bench_lora.py)."""
    import torch

    sizes = [int(b) for b in (args.batch_size or str(cfg.train.micro_batch_size)).split(",")]
    for i, b in enumerate(sizes):
        try:
            result = _model_only_at(variant, cfg, args, world, b, save, spec or variant)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return result
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            if rank == 0:
                print(f"[bench] {variant}: micro-batch {b} does not fit"
                      + (f"; trying {sizes[i + 1]}" if i + 1 < len(sizes) else ""), flush=True)
    return None


def _model_only_at(variant: str, cfg, args, world: int, micro_batch: int, save: bool = False, spec: str = "") -> dict:
    import torch

    from t2i.train.step import loss_on_latents
    from t2i.train import engine as engine_lib
    from t2i.config import from_dict, to_dict
    from t2i.models.flops import train_flops_per_sample
    from t2i.models.mmdit import build_model, preset_kwargs, velocity
    from t2i.train import optim, step_profile
    from t2i.train.timing import Phases, comm_seconds

    device = engine_lib.device()
    d = to_dict(cfg)
    d["train"]["micro_batch_size"] = micro_batch
    d["deepspeed"]["zero_stage"] = int(variant[-1]) if variant.startswith("zero") else cfg.deepspeed.zero_stage
    d["logging"]["phase_times"] = True
    cfg = from_dict(d)
    x, cond, shapes = fixed_batch(cfg, args, micro_batch, device)
    kw = preset_kwargs(cfg.model, **shapes)
    flops = train_flops_per_sample(kw, shapes["sample_size"], cond["context"].shape[1])
    bf16 = cfg.deepspeed.precision == "bf16"
    with torch.device(device):  # initialise on the accelerator: a 2.5B-parameter CPU init takes minutes
        model = build_model(cfg.model, seed=cfg.run.seed, **shapes)
    if cfg.model.pretrained:  # the folder's shape, not the preset's
        kw = bench_lora.pretrained_kwargs(cfg)
        flops = train_flops_per_sample(kw, shapes["sample_size"], cond["context"].shape[1])
    lora_modules = bench_lora.apply(model, cfg)  # lora.rank > 0: adapters, the rest frozen (as pipelines/train.py)
    counts = bench_lora.counts(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    deepspeed_engine = variant.startswith("zero")
    phases = Phases(True, device, comm=comm_seconds if deepspeed_engine else None)

    if deepspeed_engine:
        engine, _ = engine_lib.initialize(model, cfg)
        step_profile.install(engine.optimizer, phases)
        dtype = torch.bfloat16 if bf16 else torch.float32
        ctx = {k: v.to(dtype) for k, v in cond.items()}

        def step():
            with phases("forward"):
                loss, _ = loss_on_latents(engine, x, ctx, generator, cfg, device, dtype)
            with phases("backward"):
                engine.backward(loss)
            with phases("step"):
                engine.step()
    else:
        module = model
        if variant == "ddp":
            module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        # The same torch AdamW code path t2i's default takes (fused where torch has it), so the ratio
        # measures DeepSpeed and the pipeline, not two optimizer kernels.
        opt = torch.optim.AdamW(bench_lora.trainable(model), lr=cfg.train.lr, **optim.settings(cfg, device))

        def step():  # the textbook rectified-flow step, as in diffusers' train_text_to_image_sd3.py
            with phases("forward"), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                sigma = torch.sigmoid(torch.randn(micro_batch, generator=generator)).to(device)  # logit-normal
                noise = torch.randn(x.shape, generator=generator).to(device)
                s = sigma.view(-1, 1, 1, 1)
                v = velocity(module, (1 - s) * x + s * noise, 1000 * sigma, cond)
                loss = torch.nn.functional.mse_loss(v.float(), noise - x)
            with phases("backward"):
                loss.backward()
            with phases("step"):
                torch.nn.utils.clip_grad_norm_(bench_lora.trainable(model), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)

    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            phases.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    measured = phases.collect()["time"]
    result = _common(variant, cfg, args, world, micro_batch, flops, times,
                     {k: measured.get(k, 0.0) / args.steps for k in set(measured) | set(PHASES)}, device,
                     attention_report(cfg, kw, shapes["sample_size"], cond["context"].shape[1], device), cpu_times)
    result.update(counts, lora_modules=lora_modules,
                  optimizer_params=bench_lora.optimizer_numel(engine.optimizer if deepspeed_engine else opt))
    if save and deepspeed_engine:
        result["ckpt_bytes"] = bench_lora.save_and_measure(engine, Path(args.out), spec, 0,
                                                           args.warmup + args.steps, cfg)
    del step
    if deepspeed_engine and hasattr(engine, "destroy"):
        engine.destroy()
    gc.collect()
    return result


def model_shapes(cfg, text=None, vae=None) -> tuple[dict, int]:
    """(SD3Transformer2DModel shape kwargs, text tokens) of a config: from the given (or built, if tiny
    and cheap) frozen encoders; SD3's (text.preset sd3, or a real-size model.preset) by their known shapes."""
    from t2i.models import build

    if text is None and cfg.text.preset == "tiny" and cfg.model.preset == "tiny":
        text, vae = build.build_frozen(cfg, "cpu")
    if text is not None:
        size = vae.latent_size(cfg.data.resolution)
        return dict(in_channels=vae.latent_channels, sample_size=size, joint_attention_dim=text.context_dim,
                    pooled_projection_dim=text.pooled_dim), text.seq_len
    s = SD3_SHAPES
    return (dict(in_channels=s["latent_channels"], sample_size=cfg.data.resolution // s["downsample"],
                 joint_attention_dim=s["context_dim"], pooled_projection_dim=s["pooled_dim"]),
            s["clip_context"] + s["max_t5_tokens"] if cfg.text.preset == "tiny" else
            cfg.text.clip_context + cfg.text.max_t5_tokens)


def fixed_batch(cfg, args, micro_batch: int, device):
    """(latents, {context, pooled}, model shape kwargs): encoded once from real shards through the
    frozen encoders, or random tensors of the SD3 shapes with --synthetic."""
    import torch

    from t2i.train.step import encode_batch
    from t2i.models import build
    from t2i.data.loader import TrainLoader

    g = torch.Generator().manual_seed(cfg.run.seed)
    if args.synthetic:
        shapes, text_tokens = model_shapes(cfg)
        size = shapes["sample_size"]
        x = torch.randn(micro_batch, shapes["in_channels"], size, size, generator=g)
        cond = {"context": torch.randn(micro_batch, text_tokens, shapes["joint_attention_dim"], generator=g),
                "pooled": torch.randn(micro_batch, shapes["pooled_projection_dim"], generator=g)}
    else:
        text, vae = build.build_frozen(cfg, "cpu")
        shapes, _ = model_shapes(cfg, text, vae)
        loader = TrainLoader(cfg.data, seed=cfg.run.seed, rank=0, world_size=1, batch_size=micro_batch)
        x, cond = encode_batch(text, vae, next(loader), g, "cpu", torch.float32)
    return x.to(device), {k: v.to(device) for k, v in cond.items()}, shapes


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _key(r: dict) -> tuple:
    return r.get("spec", r["variant"]), r["ckpt"], r["compile"]


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (variant spec, checkpointing, compile): the round with the median step time (its phases
    belong together), with every round's step times kept in `step_ms_rounds`."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    rows = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["step_ms"])
        row = dict(runs[(len(runs) - 1) // 2])
        row["step_ms_rounds"] = [r["step_ms"] for r in sorted(runs, key=lambda r: r.get("repeat", 0))]
        rows.append(row)
    return rows


def round_ratio(results: list[dict], a: tuple, b: tuple, field: str = "step_ms_median"
                ) -> tuple[float, float, float, int] | None:
    """Median, min and max over rounds of field(a) / field(b), pairing the two in each round. The field is
    the median step time of a run by default: a burst of load from other jobs moves the mean, not it."""
    by = {}
    for r in results:
        if r.get(field):
            by.setdefault(_key(r), {})[r.get("repeat", 0)] = r[field]
    pairs = [by[a][k] / by[b][k] for k in sorted(set(by.get(a, {})) & set(by.get(b, {})))]
    if not pairs:
        return None
    return statistics.median(pairs), min(pairs), max(pairs), len(pairs)


def summarize(results: list[dict], args) -> dict:
    rows = aggregate(results)
    ratios = []

    def ratio(label, a, b, what):
        if not (a and b):
            return
        r = round_ratio(results, a, b)
        if r is None:
            return
        cpu = round_ratio(results, a, b, "cpu_ms_median")
        setting = f" (checkpointing {_ckpt(a[1])}, compile {'on' if a[2] else 'off'})"
        ratios.append({"ratio": label + setting, "value": r[0], "min": r[1], "max": r[2], "rounds": r[3],
                       "cpu": cpu[0] if cpu else None, "means": what})

    specs = list(dict.fromkeys(_key(r)[0] for r in results))
    for ckpt in (False, True):
        for comp in (False, True):
            have = {s for s, c, m in map(_key, results) if c == ckpt and m == comp}

            def k(spec):
                return (spec, ckpt, comp) if spec in have else None

            def lora_rank(spec):
                return next((r.get("lora_rank") or 0 for r in results if _key(r) == k(spec)), 0)

            t2i, bare = k("t2i"), k("bare")
            zero_stage = next((r["zero_stage"] for r in results if _key(r) == t2i), None)
            ratio("t2i / bare", t2i, bare, "step time of the full pipeline over a bare PyTorch loop")
            for stage in ([zero_stage] if zero_stage else [1, 2, 3]):
                ratio(f"zero{stage} / bare", k(f"zero{stage}"), bare,
                      "DeepSpeed's model step over the bare loop (same batch)")
            for stage in (1, 2, 3):
                ratio(f"zero{stage} / ddp", k(f"zero{stage}"), k("ddp"), "step time, same batch and loss")
            ratio("mixflow / flow matching", k("mixflow"), t2i, "full step, MixFlow loss over FM loss")
            ratio("t2i with cache / t2i", k("cache"), t2i, "full step reading the cache over encoding")
            for spec in specs:  # a variant with overrides against its plain form (and the bare loop)
                if "+" in spec and k(spec):
                    full = bench_lora.full_spec(spec)  # a LoRA variant against its full fine-tuning
                    lora = lora_rank(spec) if full != spec and k(full) and not lora_rank(full) else 0
                    other = full if lora else base_variant(spec)
                    ratio(f"{spec} / {other}", k(spec), k(other),
                          f"LoRA (rank {lora}) over full fine-tuning: step time, same batch" if lora else
                          "the overrides' effect on step time")
                    if base_variant(spec) in FULL:
                        ratio(f"{spec} / bare", k(spec), bare, "step time of the full pipeline over the bare loop")
    head = ("| variant | ckpt | compile | ZeRO | world x batch | images/s | per rank | total ms | median ms | CPU ms | "
            + " | ".join(f"{'optimizer' if p == 'step' else p} ms" for p in PHASES)
            + " | TFLOP/s per rank | MFU | peak mem GB (max rank) |")
    repeats = max((len(r["step_ms_rounds"]) for r in rows), default=1)
    if repeats > 1:
        head = head.replace("| total ms |", "| total ms | rounds: total ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        zero = r["zero_stage"] if r["variant"] in FULL or r["variant"].startswith("zero") else "-"
        ph = " | ".join(f"{r['phases_ms'].get(p, 0.0):.1f}" if r["phases_ms"].get(p) else "-" for p in PHASES)
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        spread = f" {' / '.join(f'{x:.0f}' for x in r['step_ms_rounds'])} |" if repeats > 1 else ""
        lines.append(f"| {r.get('spec', r['variant'])} | {_ckpt(r['ckpt'])} | "
                     f"{'on' if r['compile'] else 'off'} | {zero} | {r['world']} x {r['micro_batch']} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s_per_rank']:.1f} | {r['step_ms']:.1f} |{spread} "
                     f"{r['step_ms_median']:.1f} | {_fmt(r.get('cpu_ms_median'))} | {ph} | "
                     f"{r['achieved_tflops_per_rank']:.3g} | {mfu} | {max(r['peak_mem_gb_per_rank']):.2f} |")
    lines += ["", "| variant | ckpt | compile | optimizer | SDPA kernel (usable) | optimizer step ms | "
              + " | ".join(p.replace("_", " ") for p in step_profile_parts()) + " |",
              "|" + "---|" * (6 + len(step_profile_parts()))]
    for r in rows:
        att = r.get("attention") or {}
        parts = r.get("optimizer_ms") or {}
        cells = " | ".join(f"{parts[p]:.2f}" if p in parts else "-" for p in step_profile_parts())
        lines.append(f"| {r.get('spec', r['variant'])} | {_ckpt(r['ckpt'])} | "
                     f"{'on' if r['compile'] else 'off'} | {r.get('optimizer', '-')} | "
                     f"{att.get('kernel', '-')} ({', '.join(att.get('usable', []))}) | "
                     f"{r['phases_ms'].get('step', 0.0):.2f} | {cells} |")
    if ratios:
        lines += ["", "| ratio | median step time | rounds: min-max | CPU time per step | |", "|---|---:|---|---:|---|"]
        lines += [f"| {q['ratio']} | {q['value']:.3f} | "
                  + (f"{q['min']:.3f}-{q['max']:.3f} ({q['rounds']} rounds)" if q["rounds"] > 1 else "-")
                  + (f" | {q['cpu']:.3f}" if q.get("cpu") else " | -") + f" | {q['means']} |"
                  for q in ratios]
    lines += bench_lora.markdown(results, rows, _key, round_ratio)
    first = results[0] if results else {"device": "?", "preset": "?", "resolution": "?"}
    preamble = (f"Device: {first['device']}; model {first['preset']} at {first['resolution']} px; {args.warmup} "
                f"warm-up + {args.steps} measured steps per variant"
                + (f", {repeats} rounds (each row is its median round)" if repeats > 1 else "")
                + ". The comm column is inside backward/step (DeepSpeed's comms logger: time in collectives, "
                "waiting for the slower rank included), not an extra phase. The optimizer step's parts: "
                "t2i/train/step_profile.py.\n\n")
    return {"results": results, "rows": rows, "ratios": ratios, "markdown": preamble + "\n".join(lines) + "\n",
            "settings": {"steps": args.steps, "warmup": args.warmup, "nproc": args.nproc, "repeats": args.repeats,
                         "config": args.config, "overrides": args.overrides, "synthetic": args.synthetic,
                         "time": time.strftime("%Y-%m-%d %H:%M:%S")}}


def _ckpt(value) -> str:
    """model.gradient_checkpointing for the table: off, all (every block), 1/k (every k-th block)."""
    if value is False or value == 0:
        return "off"
    return "all" if value is True or value == 1 else f"1/{value}"


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def step_profile_parts() -> tuple:
    from t2i.train.step_profile import PARTS
    return PARTS


if __name__ == "__main__":
    sys.exit(main())
