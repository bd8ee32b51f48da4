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
  bare         a plain PyTorch loop: the model, AdamW, the flow-matching loss written out, no
               distribution; bf16 as diffusers' training examples do it (fp32 weights under autocast)
Data: --shards (or data.shards in --config / an override); with neither, the embedded default's
data/shapes/ shards, or when `make demo` has not written them a small shapes set made once in
~/.cache/t2i (tools/bench_data.py, announced in the log).
Printed: images/s, per-phase ms, peak memory per rank, achieved FLOP/s and MFU (t2i/models/flops.py has the
formula), and the ratios t2i/bare (pipeline overhead), zeroK/ddp, mixflow/t2i, cache/t2i.
--synthetic replaces data and encoders by random latents and text states of the config's shapes
(SD3: 16 latent channels at 1/8 resolution, 77 + 256 tokens of width 4096, pooled 2048), so
full-size MMDiTs can be measured without their text encoders' weights; only model-step variants.
"""

from __future__ import annotations

import argparse
import gc
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

FULL = ("t2i", "mixflow", "cache")
MODEL_ONLY = ("zero1", "zero2", "zero3", "ddp", "bare")
ALL = FULL + MODEL_ONLY
PHASES = ("data", "encode", "forward", "backward", "step", "ema", "comm")
# SD3 / SD3.5 conditioning shapes, for --synthetic with real-size presets.
SD3_SHAPES = {"latent_channels": 16, "downsample": 8, "context_dim": 4096, "pooled_dim": 2048,
              "clip_context": 77, "max_t5_tokens": 256}


def parse_args(argv):
    p = make_parser("bench", __doc__)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny-cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the config")
    p.add_argument("--shards", default=None,
                   help="your shards (any data.shards spec: brace range, glob, folder, list file); default: the "
                        "config's data.shards, or a cached shapes set when that is the missing default data/shapes/")
    p.add_argument("--variants", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
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
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and the variants' runs")
    p.add_argument("--in-process", action="store_true",
                   help="all variants in one process group (saves start-up; GPU peak memory is still per variant)")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which no further variant starts (for a lent GPU's fixed time)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: "variant:ckpt:compile;..."
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
    bad = [v for v in variants if v not in ALL]
    if bad:
        raise ConfigError(f"--variants: unknown {bad}; choose from {', '.join(ALL)}")
    if args.synthetic and any(v in FULL for v in variants):
        raise ConfigError(f"--synthetic measures the model step only; drop {[v for v in variants if v in FULL]}")
    if not args.synthetic:  # which shards: checked (or made) here, before any rank starts
        args.overrides = with_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results_file.unlink(missing_ok=True)
    if "cache" in variants and not args.cache:
        args.cache = build_cache(args, out / "cache")
    runs = [f"{v}:{int(ckpt)}:{int(comp)}" for comp in _flags(args.compile) for ckpt in _flags(args.ckpt)
            for v in variants]
    for group in ([";".join(runs)] if args.in_process else runs):
        if args.deadline and time.time() > args.deadline:
            print(f"[bench] deadline passed: skipping {group}", flush=True)
            continue
        rc = launch(args, group, results_file)
        if rc != 0:
            print(f"[bench] {group} failed with exit code {rc}", file=sys.stderr, flush=True)
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    report = summarize(results, args)
    write_json(out / "bench.json", report, indent=1)  # atomically: a killed bench leaves the old report or the new
    write_text(out / "bench.md", report["markdown"])
    print(report["markdown"])
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0 if results else 1


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
    for name in ("batch_size", "preset", "resolution", "precision", "cache", "peak_tflops", "deadline"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--synthetic"] if args.synthetic else [])


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
        variant, ckpt, comp = run.split(":")
        late = [bool(args.deadline and time.time() > args.deadline)]
        dist.broadcast_object_list(late, src=0)  # every rank takes the same decision
        if late[0]:
            if rank == 0:
                print(f"[bench] deadline passed: skipping {run}", flush=True)
            continue
        if rank == 0:
            print(f"[bench] {variant}  activation checkpointing {'on' if ckpt == '1' else 'off'}, "
                  f"compile {'on' if comp == '1' else 'off'}", flush=True)
        cfg = load_config(args.config, overrides + [f"model.gradient_checkpointing={ckpt == '1'}",
                                                    f"model.compile={comp == '1'}"])
        if variant in FULL:
            result = run_full(variant, cfg, args, rank, world)
        else:
            result = run_model_only(variant, cfg, args, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0 and result is not None:
            merged = dict(gathered[0], peak_mem_gb_per_rank=[g["peak_mem_gb"] for g in gathered])
            append_result(args.results, merged)
            print(f"[bench] {variant}: {merged['images_per_s']:.2f} images/s, micro-batch {merged['micro_batch']}, "
                  f"peak {max(merged['peak_mem_gb_per_rank']):.1f} GB"
                  + (f", MFU {100 * merged['mfu']:.1f} %" if merged.get("mfu") else ""), flush=True)
        dist.barrier()
    return 0


def _common(variant, cfg, args, world, micro_batch, flops_per_sample, step_times, phases, device) -> dict:
    import torch

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
            "resolution": cfg.data.resolution, "preset": cfg.model.preset, "device": name,
            "steps": len(step_times), "step_ms": 1e3 * mean, "step_ms_median": 1e3 * statistics.median(step_times),
            "images_per_s": ips, "images_per_s_per_rank": ips / world,
            "phases_ms": {k: 1e3 * v for k, v in phases.items()},
            "train_flops_per_image": flops_per_sample, "achieved_tflops_per_rank": achieved / 1e12,
            "mfu": achieved / peak if peak else None, "peak_mem_gb": peak_memory_gb(device)}


def run_full(variant: str, cfg, args, rank: int, world: int) -> dict:
    """pipelines.train.main itself, with phase timings on; the numbers come from its metrics.jsonl."""
    from pipelines import train
    from t2i.train import engine as engine_lib
    from t2i.config import from_dict, to_dict
    from t2i.models.flops import train_flops_per_sample
    from t2i.models.mmdit import preset_kwargs
    from t2i.train.timing import peak_memory_gb

    d = to_dict(cfg)
    run_root = Path(args.out) / "runs"
    d["run"].update(output_dir=str(run_root), name=f"{variant}-{os.getpid() if rank == 0 else 0}")
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
    run_dir = train.main(run_cfg, stop_at=args.warmup + args.steps, save_last=False)
    device = engine_lib.device()
    if rank != 0:  # metrics.jsonl is rank 0's; the other ranks report their peak memory only
        return {"peak_mem_gb": peak_memory_gb(device)}
    shapes, text_tokens = model_shapes(run_cfg)
    flops = train_flops_per_sample(preset_kwargs(run_cfg.model, **shapes), shapes["sample_size"], text_tokens)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    measured = steps[args.warmup:]
    elapsed = [r["elapsed_s"] for r in steps]
    step_times = [b - a for a, b in zip(elapsed[args.warmup - 1:], elapsed[args.warmup:])]  # warmup >= 1
    phases = {k: statistics.fmean(r["time"].get(k, 0.0) for r in measured) for k in PHASES}
    return _common(variant, run_cfg, args, world, run_cfg.train.micro_batch_size, flops, step_times, phases, device)


def run_model_only(variant: str, cfg, args, rank: int, world: int) -> dict | None:
    """One fixed batch; the chosen loop; batch sizes tried in order until one fits in memory."""
    import torch

    sizes = [int(b) for b in (args.batch_size or str(cfg.train.micro_batch_size)).split(",")]
    for i, b in enumerate(sizes):
        try:
            result = _model_only_at(variant, cfg, args, world, b)
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


def _model_only_at(variant: str, cfg, args, world: int, micro_batch: int) -> dict:
    import torch

    from t2i.train.step import loss_on_latents
    from t2i.train import engine as engine_lib
    from t2i.config import from_dict, to_dict
    from t2i.models.flops import train_flops_per_sample
    from t2i.models.mmdit import build_model, preset_kwargs, velocity
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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    deepspeed_engine = variant.startswith("zero")
    phases = Phases(True, device, comm=comm_seconds if deepspeed_engine else None)

    if deepspeed_engine:
        engine, _ = engine_lib.initialize(model, cfg)
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
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")

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
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            phases.collect()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    measured = phases.collect()["time"]
    result = _common(variant, cfg, args, world, micro_batch, flops, times,
                     {k: measured.get(k, 0.0) / args.steps for k in PHASES}, device)
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


def summarize(results: list[dict], args) -> dict:
    def find(variant, **kw):
        for r in results:
            if r["variant"] == variant and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    ratios = []

    def ratio(label, a, b, what):
        if a and b:
            setting = f" (checkpointing {'on' if a['ckpt'] else 'off'}, compile {'on' if a['compile'] else 'off'})"
            ratios.append({"ratio": label + setting, "value": a["step_ms"] / b["step_ms"], "means": what})

    for ckpt in (False, True):
        for comp in (False, True):
            kw = {"ckpt": ckpt, "compile": comp}
            t2i, bare = find("t2i", **kw), find("bare", **kw)
            ratio("t2i / bare", t2i, bare, "step time of the full pipeline over a bare PyTorch loop")
            if t2i:
                ratio(f"zero{t2i['zero_stage']} / bare", find(f"zero{t2i['zero_stage']}", **kw), bare,
                      "DeepSpeed's model step over the bare loop (same batch)")
            else:
                for k in (1, 2, 3):
                    ratio(f"zero{k} / bare", find(f"zero{k}", **kw), bare,
                          "DeepSpeed's model step over the bare loop (same batch)")
            for k in (1, 2, 3):
                ratio(f"zero{k} / ddp", find(f"zero{k}", **kw), find("ddp", **kw), "step time, same batch and loss")
            ratio("mixflow / flow matching", find("mixflow", **kw), t2i, "full step, MixFlow loss over FM loss")
            ratio("t2i with cache / t2i", find("cache", **kw), t2i, "full step reading the cache over encoding")
    head = ("| variant | ckpt | compile | ZeRO | world x batch | images/s | per rank | total ms | "
            + " | ".join(f"{'optimizer' if p == 'step' else p} ms" for p in PHASES)
            + " | TFLOP/s per rank | MFU | peak mem GB (max rank) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        zero = r["zero_stage"] if r["variant"] in ("t2i", "mixflow", "cache") or r["variant"].startswith("zero") \
            else "-"
        ph = " | ".join(f"{r['phases_ms'].get(p, 0.0):.1f}" if r["phases_ms"].get(p) else "-" for p in PHASES)
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['variant']} | {'on' if r['ckpt'] else 'off'} | {'on' if r['compile'] else 'off'} | "
                     f"{zero} | {r['world']} x {r['micro_batch']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_per_rank']:.1f} | {r['step_ms']:.1f} | {ph} | "
                     f"{r['achieved_tflops_per_rank']:.3g} | {mfu} | {max(r['peak_mem_gb_per_rank']):.2f} |")
    if ratios:
        lines += ["", "| ratio (step time) | value | |", "|---|---:|---|"]
        lines += [f"| {q['ratio']} | {q['value']:.3f} | {q['means']} |" for q in ratios]
    first = results[0] if results else {"device": "?", "preset": "?", "resolution": "?"}
    preamble = (f"Device: {first['device']}; model {first['preset']} at {first['resolution']} px; {args.warmup} "
                f"warm-up + {args.steps} measured steps per variant. The comm column is inside backward/step "
                "(DeepSpeed's comms logger: time in collectives, waiting for the slower rank included), "
                "not an extra phase.\n\n")
    return {"results": results, "ratios": ratios, "markdown": preamble + "\n".join(lines) + "\n",
            "settings": {"steps": args.steps, "warmup": args.warmup, "nproc": args.nproc,
                         "config": args.config, "overrides": args.overrides, "synthetic": args.synthetic,
                         "time": time.strftime("%Y-%m-%d %H:%M:%S")}}


if __name__ == "__main__":
    sys.exit(main())
