"""What a training run holds right after it resumes (run by tests/test_ckpt_tools.py, under torchrun for
several ranks): build the engine from <run>/config.yaml exactly as pipelines/train.main does, restore
`latest` with t2i.train.checkpointer.Checkpointer.restore at this world size, and save on rank 0

    weights, exp_avg, exp_avg_sq   full fp32 tensors per parameter (DeepSpeed's safe_get_full_* API)
    adam_step                      the optimizer's step count(s)
    ema                            the EMA, gathered and consolidated (t2i.checkpoint.ema.consolidate)
    ema_updates, data, step, skipped, world_size
    prediction                     t2i.models.mmdit.velocity of the DeepSpeed engine on `fixed_inputs`

    python tests/ckpt_probe.py RUN OUT.pt
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def fixed_inputs(in_channels: int, sample_size: int, joint_dim: int, pooled_dim: int, n: int = 2):
    """(x, timestep, cond): a fixed input for comparing predictions of the same weights."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, in_channels, sample_size, sample_size, generator=g)
    cond = {"context": torch.randn(n, 7, joint_dim, generator=g), "pooled": torch.randn(n, pooled_dim, generator=g)}
    return x, torch.tensor([250.0, 750.0][:n]), cond


def main(run_dir: Path, out: Path) -> None:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from t2i.train.checkpointer import Checkpointer
    from t2i.train import engine as engine_lib
    from t2i.models import build
    from t2i.config import load_config
    from t2i.checkpoint.ema import ShardedEMA, consolidate
    from t2i.models.mmdit import velocity

    rank, world = engine_lib.init_distributed()
    cfg = load_config(run_dir / "config.yaml")
    text, vae = build.build_frozen(cfg)
    model = build.build_for(cfg, text, vae)
    engine, _ = engine_lib.initialize(model, cfg)
    ema = ShardedEMA(engine.module, cfg.train.ema_decay)
    generator = torch.Generator().manual_seed(1_000_003 * cfg.run.seed + rank)
    step, data, skipped = Checkpointer(run_dir / "checkpoints", cfg, engine, ema, generator, world).restore()

    state = {"step": step, "skipped": skipped, "world_size": world, "weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():  # collective under ZeRO-3
        state["weights"][name] = safe_get_full_fp32_param(p).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = safe_get_full_optimizer_state(p, key).detach().clone()
    state["adam_step"] = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
    gathered = [None] * world
    dist.all_gather_object(gathered, {"ema": ema.state_dict(), "data": data})
    state["ema"] = consolidate([g["ema"] for g in gathered])
    state["ema_updates"] = ema.updates
    state["data"] = [g["data"] for g in gathered]
    c = engine.module.config
    x, t, cond = fixed_inputs(c.in_channels, c.sample_size, c.joint_attention_dim, c.pooled_projection_dim)
    with torch.no_grad():
        state["prediction"] = velocity(engine, x, t, cond).float()
    if rank == 0:
        torch.save(state, out)
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
