"""The `t2i` command.

    t2i demo  [--nproc 2] [key=value ...]          shapes shards -> train the tiny model -> samples + loss plot
    t2i train [--config C] [--resume [TAG] | --auto-resume] [--nproc N] [--stop-at S] [key=value ...]
    t2i config [--config C] [key=value ...]        print the resolved, validated config
    t2i make-shards {shapes,folder} ...            write WebDataset shards (tools/make_shards.py)
    t2i slowflow --ckpt LABEL=RUN ... --steps 4 8 16 32 --out DIR   exposure-bias report (pipelines/slowflow.py)
    t2i sample --ckpt RUN --prompts P --out DIR [--nproc N | --shard i/n]   images in GenEval's layout
    t2i geneval DIR [--prompts P] [--detector shapes|mask2former:PATH]      GenEval score (pipelines/geneval.py)
    t2i geneval-prompts --out DIR [--per-tag 16]   a GenEval prompt set for the shapes domain
    t2i fid {ref,score} ...                        FID / KID against saved reference statistics (pipelines/fid.py)
    t2i clipscore --images DIR --pretrained FILE   CLIP score of a GenEval-layout folder (pipelines/clipscore.py)
    t2i eval --ckpt LABEL=RUN ... --out DIR        sample + GenEval + FID (+ CLIP score) report (pipelines/evaluate.py)
    t2i ckpt {list,consolidate,export,universal}   checkpoint tools: safetensors, diffusers folder (tools/ckpt.py)
    t2i cache --config C --out DIR [--nproc N]     precompute text encodings + VAE latents (data.cache=DIR)

Config overrides (key.path=value) may go anywhere on the line. Nothing is ever downloaded from a
model hub: every pretrained component is a local path.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from t2i.cliargs import add_overrides_argument, parse_with_overrides, resolution_arg
from t2i.cmdline import HelpFormatter
from t2i.errors import EXIT_PREEMPTED, EXIT_USER, Preempted, T2IError
from t2i.runtime import configure_environment, relaunch, under_launcher


# Commands whose own argparse takes the rest of the command line: name -> ("module:function", help).
TOOLS = {
    "make-shards": ("tools.make_shards:main", "write WebDataset shards (tools/make_shards.py)"),
    "slowflow": ("pipelines.slowflow:main", "exposure-bias report of checkpoints (pipelines/slowflow.py)"),
    "geneval": ("pipelines.geneval:main", "GenEval-score a folder of samples (pipelines/geneval.py)"),
    "geneval-prompts": ("pipelines.geneval:prompts_main", "write a GenEval prompt set for the shapes domain"),
    "fid": ("pipelines.fid:main", "FID / KID: reference statistics and scores (pipelines/fid.py)"),
    "clipscore": ("pipelines.clipscore:main", "CLIP score of a folder of samples (pipelines/clipscore.py)"),
    "ckpt": ("tools.ckpt:main", "consolidate a ZeRO checkpoint / export a diffusers folder (tools/ckpt.py)"),
    "bench": ("tools.bench:main", "training-step throughput, phases, MFU; t2i vs bare / DDP / ZeRO (tools/bench.py)"),
    "cache": ("tools.cache:main", "precompute text encodings + VAE latents per shard (tools/cache.py)"),
    "bench-loader": ("tools.bench_loader:main", "samples/s of the data loader vs a plain webdataset loop"),
}


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, checkpoints/, a tag folder, or a diffusers folder")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a diffusers-format LoRA (pytorch_lora_weights.safetensors, or its folder: t2i ckpt export "
                        "of a LoRA run, or another tool's) applied to --ckpt; safetensors only. A LoRA run given as "
                        "--ckpt needs none: its base and adapters are read from the run")
    p.add_argument("--prompts", required=True, help="GenEval metadata .jsonl, a .txt (one prompt per line) or shards")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--out", required=True, help="output folder (GenEval layout)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps = model evaluations (default: the checkpoint's sample.steps; a diffusers "
                        "folder without --config: its model card's, docs/design/evaluation.md section 3)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: as --steps)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="CFG only while sigma_lo <= sigma <= sigma_hi, one conditional pass elsewhere (default: "
                        "sample.guidance_interval; [0, 1] guides every step)")
    p.add_argument("--shift", type=float, default=None,
                   help="sigma shift (default: sample.shift; a diffusers folder without --config: its scheduler's)")
    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="N|WxH",
                   help="a square side, or WIDTHxHEIGHT in pixels (e.g. 1216x832; each a multiple of the VAE factor "
                        "x patch size). Default: data.resolution; a diffusers folder without --config: transformer "
                        "sample_size x VAE factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="part of the settings: the same batches on any split")
    p.add_argument("--shard", default=None, metavar="I/N", help="this job's share, e.g. $SLURM_ARRAY_TASK_ID/16")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. `argv` None: this process *is* the command (the `t2i` script,
    `python -m t2i.cli`, a rank), so it ends right after and skips the garbage collector's passes over
    every library object at interpreter exit (1.6 s of a 1.9 s exit with torch, diffusers and DeepSpeed
    loaded, for each process and rank): gc.freeze() moves them out of the collector's reach. Module
    teardown still closes and flushes files, and atexit handlers (wandb, multiprocessing) still run."""
    rc = command(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        gc.freeze()
    return rc


def command(argv: list[str]) -> int:
    if argv[:1] == ["train"] and under_launcher():  # a training rank: a requeue signal must not kill it
        from t2i.train.preemption import install_early
        install_early()
    args = parse(argv)
    try:
        return run(args, argv)
    except T2IError as e:  # the one place user errors are reported: one line, exit 2
        print(f"t2i {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USER
    except Preempted as e:
        print(f"t2i: {e}; exiting with {EXIT_PREEMPTED} (requeue and resume with --auto-resume)", file=sys.stderr)
        return EXIT_PREEMPTED


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line -> its namespace; `key=value` overrides anywhere (t2i.cliargs) in `.overrides`.
    A tool command (TOOLS) gets the rest of the line verbatim in `.rest`."""
    parser = argparse.ArgumentParser(prog="t2i", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("train", "train an MMDiT (pretrain / mixflow / control stage)"),
                        ("demo", "the embedded default, end to end on the CPU"),
                        ("config", "print the resolved config")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="YAML config (default: configs/tiny-cpu.yaml)")
        add_overrides_argument(p)
        if name in ("train", "demo"):
            p.add_argument("--nproc", type=int, default=2 if name == "demo" else 1,
                           help="local ranks to launch with torchrun (ignored when already under a launcher)")
        if name == "demo":
            p.add_argument("--mixflow-steps", type=int, default=100,
                           help="MixFlow post-training steps after pretraining (0 skips the stage)")
        if name == "train":
            p.add_argument("--resume", nargs="?", const=True, default=False, metavar="TAG",
                           help="continue from <run>/checkpoints/latest, or from TAG (a tag name or folder of "
                                "this run, e.g. when the newest checkpoint is damaged), with the run's own "
                                "config.yaml; overrides may only change what may change mid-run (docs/resume.md)")
            p.add_argument("--auto-resume", action="store_true",
                           help="resume when <run>/checkpoints/latest exists, else start (for requeued jobs)")
            p.add_argument("--force-override", action="store_true",
                           help="with --resume: also apply overrides that change the run's identity (model, "
                                "data, objective, seed, ZeRO stage, batch ...), e.g. after moving the data")
            p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                           help="checkpoint and stop at this step (resume later with --resume)")
    p = sub.add_parser("sample", help="sample a prompt set into GenEval's folder layout (pipelines/sample.py)",
                       formatter_class=HelpFormatter)
    add_sample_arguments(p)
    p = sub.add_parser("eval", help="sample + score checkpoints; one report (pipelines/evaluate.py)",
                       formatter_class=HelpFormatter)
    from pipelines.evaluate import add_arguments as add_eval_arguments
    add_eval_arguments(p)
    for name in ("sample", "eval"):
        p = sub.choices[name]
        p.add_argument("--config", default=None, help="config for a diffusers --ckpt (default: configs/tiny-cpu.yaml)")
        p.add_argument("--nproc", type=int, default=1, help="local ranks to launch with torchrun")
        add_overrides_argument(p)
    for name in TOOLS:
        p = sub.add_parser(name, help=TOOLS[name][1], add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    if argv and argv[0] in TOOLS:  # their own argparse takes the rest verbatim
        return argparse.Namespace(command=argv[0], rest=argv[1:])
    return parse_with_overrides(parser, argv, subparsers=sub, optional_values=("resume",))


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Dispatch one command to the pipeline or tool that implements it (this is the only module of
    the library that imports pipelines/ and tools/)."""
    if args.command in TOOLS:
        if args.command != "make-shards":
            configure_environment()
        module, attr = TOOLS[args.command][0].split(":")
        rc = getattr(importlib.import_module(module), attr)(args.rest)
        return rc if isinstance(rc, int) else 0  # some tools return their report

    from t2i.config import load_config

    notes = []
    if args.command == "train":  # the run's own config on a resume, the data checked: before any rank starts
        configure_environment()
        from t2i.train.plan import plan_training
        cfg, notes = plan_training(args.config, args.overrides, "auto" if args.auto_resume else args.resume,
                                   force_override=args.force_override)
    else:
        cfg = load_config(args.config, args.overrides)  # a config error ends here, before any heavy import
    if args.command == "config":
        from t2i.config import describe
        from t2i.config_warnings import odd_values
        print(describe(args.config, args.overrides), end="")  # + what model.pretrained implied, placeholders
        for line in odd_values(cfg):
            print(f"t2i config: warning: {line}", file=sys.stderr)
        return 0
    configure_environment()
    if args.command == "demo":  # (train: t2i.train.plan checked it)
        from t2i.models.geometry import check_geometry
        check_geometry(cfg)  # before torchrun, DeepSpeed or any model starts
    if args.command == "demo":
        from pipelines.demo import main as demo
        return demo(cfg, args.config, args.overrides, nproc=args.nproc, mixflow_steps=args.mixflow_steps)
    if not under_launcher() and args.nproc > 1:
        return relaunch(args.nproc, argv)
    if args.command in ("sample", "eval"):
        module = importlib.import_module("pipelines.sample" if args.command == "sample" else "pipelines.evaluate")
        return module.main(args, cfg)
    from pipelines.train import main as train
    train(cfg, resume="auto" if args.auto_resume else args.resume, stop_at=args.stop_at, notes=notes,
          force=args.force_override)
    return 0


if __name__ == "__main__":
    sys.exit(main())
