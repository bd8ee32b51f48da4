"""The sliced EMA against an EMA of the gathered fp32 master weights, computed independently (run by
tests/test_ema_scale.py under torchrun): build the tiny engine at the given ZeRO stage and precision, take
a few optimizer steps on fixed random inputs, and after each step update both

    t2i.checkpoint.ema.ShardedEMA        (this rank's slice, from the fp32 master fragment / partition)
    a reference on every rank:           ref ← d·ref + (1 − d)·safe_get_full_fp32_param(p)

then gather the slices (all_gather_object), consolidate them and save on rank 0
{"max_abs_diff", "ref_norm", "ema_bytes" (per rank), "source", "slices" (per rank), "module_differs"
(the EMA is not the EMA of the bf16 module weights, bf16 only)}.

    python tests/ema_master_probe.py STAGE PRECISION STEPS OUT.pt
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SMALL = "model.kwargs={num_layers: 1, attention_head_dim: 8, num_attention_heads: 4, caption_projection_dim: 32}"


def main(stage: int, precision: str, steps: int, out: Path) -> None:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from ckpt_probe import fixed_inputs
    from t2i.checkpoint.ema import ShardedEMA, consolidate
    from t2i.config import load_config
    from t2i.models import build
    from t2i.models.mmdit import velocity
    from t2i.train import engine as engine_lib

    rank, world = engine_lib.init_distributed()
    cfg = load_config(overrides=[SMALL, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                 "data.resolution=16", "train.micro_batch_size=2", "train.ema_decay=0.9"])
    text, vae = build.build_frozen(cfg)
    model = build.build_for(cfg, text, vae)
    engine, optimizer = engine_lib.initialize(model, cfg)
    ema = ShardedEMA(engine.module, cfg.train.ema_decay)
    params = list(engine.module.named_parameters())
    ref = {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params}
    module_ema = {n: p.detach().float().clone() for n, p in params} if stage < 3 else None
    c = engine.module.config
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for step in range(steps):
        engine_lib.set_lr(optimizer, 1e-2)
        x, t, cond = fixed_inputs(c.in_channels, c.sample_size, c.joint_attention_dim, c.pooled_projection_dim)
        g = torch.Generator().manual_seed(100 * step + rank)
        target = torch.randn(x.shape, generator=g)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        loss = (velocity(engine, x.to(dtype), t, cond).float() - target).pow(2).mean()
        engine.backward(loss)
        engine.step()
        d = ema.update(engine.module)
        for n, p in params:  # collective under ZeRO-3
            ref[n].lerp_(safe_get_full_fp32_param(p).detach().float(), 1 - d)
            if module_ema is not None:
                module_ema[n].lerp_(p.detach().float(), 1 - d)
    gathered = [None] * world
    state = ema.state_dict()
    dist.all_gather_object(gathered, {**state, "shadow": {n: t.cpu() for n, t in state["shadow"].items()}})
    full = consolidate(gathered)
    result = {"max_abs_diff": max(float((full[n] - ref[n]).abs().max()) for n in ref),
              "ref_norm": float(sum(r.norm() ** 2 for r in ref.values()) ** 0.5),
              "ema_bytes": [sum(t.numel() * 4 for t in s["shadow"].values()) for s in gathered],
              "params": sum(r.numel() for r in ref.values()), "source": state["source"],
              "slices": [s["slices"] for s in gathered], "updates": ema.updates}
    if module_ema is not None:
        result["module_max_abs_diff"] = max(float((full[n] - module_ema[n]).abs().max()) for n in ref)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
