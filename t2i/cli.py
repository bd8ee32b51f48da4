"""The `t2i` command.

    t2i demo  [--nproc 2] [key=value ...]          shapes shards -> train the tiny model -> samples + loss plot
    t2i train [--config C] [--resume] [--nproc N] [key=value ...]
    t2i config [--config C] [key=value ...]        print the resolved, validated config
    t2i make-shards {shapes,folder} ...            write WebDataset shards (tools/make_shards.py)
    t2i slowflow --ckpt LABEL=RUN ... --steps 4 8 16 32 --out DIR   exposure-bias report (tools/slowflow.py)

Nothing is ever downloaded from a model hub: every pretrained component is a local path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _environment() -> None:
    """Process-wide settings that must precede the heavy imports."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")           # weights come from local folders only
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")      # DeepSpeed's CPU accelerator + gloo


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` local ranks (unless already launched)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "t2i.cli", *argv]
    return subprocess.call(cmd)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="t2i", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("train", "train an MMDiT (pretrain / mixflow / control stage)"),
                        ("demo", "the embedded default, end to end on the CPU"),
                        ("config", "print the resolved config")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="YAML config (default: configs/tiny-cpu.yaml)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides")
        if name in ("train", "demo"):
            p.add_argument("--nproc", type=int, default=2 if name == "demo" else 1,
                           help="local ranks to launch with torchrun (ignored when already under a launcher)")
        if name == "demo":
            p.add_argument("--mixflow-steps", type=int, default=100,
                           help="MixFlow post-training steps after pretraining (0 skips the stage)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from <run>/checkpoints/latest")
            p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                           help="checkpoint and stop at this step (resume later with --resume)")
    for name, help_ in [("make-shards", "write WebDataset shards (tools/make_shards.py)"),
                        ("slowflow", "exposure-bias report of checkpoints (tools/slowflow.py)")]:
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    if argv and argv[0] in ("make-shards", "slowflow"):  # their own argparse takes the rest verbatim
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = parser.parse_args(argv)

    if args.command == "make-shards":
        from tools.make_shards import main as make_shards
        make_shards(args.rest)
        return 0
    if args.command == "slowflow":
        _environment()
        from tools.slowflow import main as slowflow
        slowflow(args.rest)
        return 0

    _environment()
    from t2i.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"t2i: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "config":
        import yaml
        from t2i.config import to_dict
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.command == "demo":
        from pipelines.demo import main as demo
        return demo(cfg, args.config, args.overrides, nproc=args.nproc, mixflow_steps=args.mixflow_steps)

    if "RANK" not in os.environ and args.nproc > 1:
        return _relaunch(args.nproc, _strip_nproc(argv))
    from pipelines.train import main as train
    from t2i.checkpoint import CheckpointError
    from t2i.data.loader import DataError
    try:
        train(cfg, resume=args.resume, stop_at=args.stop_at)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"t2i: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    t0 = time.time()
    sys.exit(main())
