"""The optimizer section: which AdamW each kind builds with which settings, and that a resumed run keeps
the configured code path (fused) and hyperparameters although the checkpoint restores its own."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from t2i.config import load_config
from t2i.train import optim

CPU = torch.device("cpu")


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(8))]


def test_adamw_is_fused_by_default_where_torch_has_the_kernel_and_carries_the_train_hyperparameters():
    cfg = load_config(overrides=["train.lr=0.01", "train.betas=[0.8, 0.95]", "train.weight_decay=0.1",
                                 "optimizer.eps=1e-6"])
    assert optim.fused_supported(CPU)  # torch >= 2.4 has a CPU fused AdamW
    opt = optim.build(params(), cfg, CPU)
    g = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW
    assert (g["fused"], g["foreach"], g["lr"], g["betas"], g["eps"], g["weight_decay"]) == \
        (True, False, 0.01, (0.8, 0.95), 1e-6, 0.1)
    for impl, flags in [("foreach", (False, True)), ("for_loop", (False, False)), ("fused", (True, False))]:
        g = optim.build(params(), load_config(overrides=[f"optimizer.implementation={impl}"]), CPU).param_groups[0]
        assert (g["fused"], g["foreach"]) == flags
    assert optim.implementation(cfg, torch.device("meta")) == "foreach"  # no fused kernel there: auto falls back


def test_the_deepspeed_kinds_build_their_optimizers_with_the_same_settings():
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    for kind, builder, name in [("cpu_adam", CPUAdamBuilder, "DeepSpeedCPUAdam"), ("deepspeed_adam", FusedAdamBuilder,
                                                                                   "FusedAdam")]:
        if not builder().is_compatible():
            pytest.skip(f"{name}'s op cannot be built here")
        cfg = load_config(overrides=[f"optimizer.kind={kind}", "train.betas=[0.8, 0.95]", "train.weight_decay=0.1"])
        opt = optim.build(params(), cfg, CPU)
        g = opt.param_groups[0]
        assert type(opt).__name__ == name and (tuple(g["betas"]), g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-8, 0.1)
        assert optim.zero_offload(cfg) == ({"device": "cpu", "pin_memory": True} if kind == "cpu_adam" else None)


def test_adamw_8bit_without_bitsandbytes_is_a_clear_error():
    from t2i.errors import ConfigError

    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"optimizer.kind=adamw_8bit needs bitsandbytes \(pip install 't2i\[bnb\]'\)"):
        optim.build(params(), load_config(overrides=["optimizer.kind=adamw_8bit"]), CPU)


def test_restore_settings_puts_back_the_configured_path_and_hyperparameters_a_checkpoint_overwrote():
    """A checkpoint written by a foreach AdamW with other betas: torch's load_state_dict takes the saved group
    settings; restore_settings returns to the config's and the fused step runs."""
    old = torch.optim.AdamW(params(), lr=1e-3, betas=(0.9, 0.999), foreach=True)
    for p in old.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    old.step()
    cfg = load_config(overrides=["train.betas=[0.9, 0.99]"])
    new = optim.build(params(), cfg, CPU)
    new.load_state_dict(old.state_dict())
    g = new.param_groups[0]
    assert (g["fused"], g["foreach"], g["betas"]) == (None, True, (0.9, 0.999))  # what a plain load leaves
    changed = optim.restore_settings(new, cfg, CPU)
    assert changed == {"fused": (None, True), "foreach": (True, False), "betas": ((0.9, 0.999), (0.9, 0.99)),
                       "weight_decay": (0.01, 0.0)}  # torch's AdamW default vs the config's
    assert (g["fused"], g["foreach"], g["betas"], g["eps"], g["weight_decay"]) == (True, False, (0.9, 0.99), 1e-8, 0.0)
    assert new.defaults["fused"] is True
    for p in g["params"]:
        p.grad = torch.ones_like(p)
    new.step()  # the fused kernel accepts the moved step counters
    assert all(new.state[p]["step"].item() == 2 for p in g["params"])
    assert optim.restore_settings(new, cfg, CPU) == {}
    assert optim.describe(new) == "torch.optim.adamw.AdamW fused, betas (0.9, 0.99), eps 1e-08, weight_decay 0.0"


RESUME_SCRIPT = """
import json, sys, torch
from t2i.runtime import configure_environment
configure_environment()
from t2i.config import load_config
from t2i.models.mmdit import build_model
from t2i.train import engine as engine_lib, optim
engine_lib.init_distributed()
def make(overrides):
    cfg = load_config(None, ["model.kwargs={num_layers: 1}", "train.micro_batch_size=2", *overrides])
    model = build_model(cfg.model, in_channels=3, sample_size=8, joint_attention_dim=16, pooled_projection_dim=8)
    return cfg, *engine_lib.initialize(model, cfg)
cfg, engine, opt = make(["optimizer.implementation=foreach", "train.betas=[0.9, 0.999]"])
x = torch.randn(2, 3, 8, 8)
out = engine(hidden_states=x, timestep=torch.ones(2), encoder_hidden_states=torch.randn(2, 4, 16),
             pooled_projections=torch.randn(2, 8), return_dict=False)[0]
engine.backward(out.square().mean())
engine.step()
engine.save_checkpoint(sys.argv[1], tag="t")
cfg, engine, opt = make(["train.betas=[0.9, 0.99]"])
engine.load_checkpoint(sys.argv[1], tag="t")
keys = ("fused", "foreach", "betas", "eps", "weight_decay")
loaded = {k: opt.param_groups[0][k] for k in keys}
optim.restore_settings(opt, cfg, engine_lib.device())
print(json.dumps({"loaded": loaded, "restored": {k: opt.param_groups[0][k] for k in keys},
                  "defaults": {k: optim.base_optimizer(opt).defaults[k] for k in keys},
                  "step": optim.base_optimizer(opt).state[opt.param_groups[0]["params"][0]]["step"].item()}))
"""


def test_a_deepspeed_resume_keeps_fused_and_the_configured_hyperparameters(tmp_path):
    """Real DeepSpeed (ZeRO-2, one gloo rank): a checkpoint of a foreach AdamW with betas (0.9, 0.999) loaded
    into a run configured fused with (0.9, 0.99): DeepSpeed's load brings the old settings back, t2i's resume
    (restore_settings, called by pipelines/train.py after every restore) the configured ones."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["loaded"]["fused"], got["loaded"]["foreach"], got["loaded"]["betas"]) == (False, True, [0.9, 0.999])
    assert got["restored"] == {"fused": True, "foreach": False, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0}
    assert got["defaults"] == got["restored"] and got["step"] == 1
