"""LoRA training (lora.rank > 0): the config section, the EMA of the adapters only, and on 2 gloo ranks under
ZeRO-2 and ZeRO-3 the exact resume of a LoRA run whose checkpoints hold the adapters only (the frozen base is
rebuilt and checked by content hash on a resume)."""

import json

import pytest
import torch

from helpers import run_t2i, tiny_train_args
from t2i.checkpoint import store
from t2i.checkpoint.ema import ShardedEMA
from t2i.config import LORA_INITS, LORA_TARGETS, Config, load_config
from t2i.errors import ConfigError
from t2i.models import lora
from test_train_resume import K, straight_and_resumed


def test_the_lora_section_defaults_to_full_fine_tuning_and_checks_its_keys():
    cfg = load_config()
    assert cfg.lora.rank == 0 and cfg.lora.alpha is None and cfg.lora.blocks is None and cfg.lora.init == "gaussian"
    assert tuple(LORA_TARGETS) == lora.DEFAULT_TARGETS and cfg.lora.targets == list(lora.DEFAULT_TARGETS)
    assert Config().lora == cfg.lora and LORA_INITS == lora.INITS
    ok = load_config(overrides=["lora.rank=8", "lora.alpha=16", "lora.blocks=[0, 2]", "lora.init=orthogonal",
                                "lora.dropout=0.1", "lora.targets=[attn.to_q]"])
    assert (ok.lora.rank, ok.lora.alpha, ok.lora.blocks, ok.lora.targets) == (8, 16.0, [0, 2], ["attn.to_q"])
    for bad in (0, -1.0):  # the config's alpha rule is t2i.models.lora.check_rank's
        with pytest.raises(ConfigError, match="lora.alpha must be a positive number"):
            lora.check_rank(4, alpha=bad)
    for override, pattern in [("lora.rank=-1", r"lora.rank must be an integer >= 0"),
                              ("lora.rank=2.5", r"'lora.rank' expects int"),
                              ("lora.alpha=0", r"lora.alpha must be a positive number"),
                              ("lora.init=pissa", r"lora.init must be one of"),
                              ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\)"),
                              ("lora.targets=[]", r"lora.targets must be a non-empty list"),
                              ("lora.blocks=[]", r"lora.blocks must be null"),
                              ("lora.blocks=[-1]", r"lora.blocks must be null")]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(overrides=["lora.rank=4", override] if "rank" not in override else [override])


def test_the_ema_of_a_lora_run_keeps_the_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    full, adapters = ShardedEMA(model, 0.9, rank=0, world=1), ShardedEMA(model, 0.9, rank=0, world=1, trainable_only=True)
    assert set(full.shadow) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert set(adapters.shadow) == set(adapters.state_dict()["shapes"]) == {"1.weight", "1.bias"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    full.update(model)
    adapters.update(model)
    for n in adapters.shadow:
        assert torch.equal(adapters.shadow[n], full.shadow[n])


def _tag_bytes(tag_dir) -> int:
    return sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())


def _model_file(tag_dir) -> dict:
    files = sorted(tag_dir.glob("*model_states.pt"))
    assert files, sorted(p.name for p in tag_dir.iterdir())
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_lora_run_resumes_exactly_and_its_checkpoints_hold_only_the_adapters(make_shards, tmp_path, zero_stage):
    """K steps + resume + K steps = 2K steps (losses within 1e-6, same sample keys) for a rank-4 LoRA on the
    tiny from-scratch base (deterministic in run.seed); the tags hold the adapters only; the saved adapters are
    the live ones (the resumed losses depend on them: B starts at 0); another base is refused on resume."""
    shards = make_shards(n_shards=4, per_shard=12)
    runs = tmp_path / "runs"
    # the base: a briefly trained tiny run (a from-scratch model's zero-initialised output layers pass no gradient
    # to adapters inside a frozen base); it is also the full run whose tag size the LoRA tags are compared with
    run_t2i("train", *tiny_train_args(shards, runs, "parent", **{"train.steps": 2, "train.ckpt_every": 2,
                                                                   "train.warmup_steps": 1}))
    parent = runs / "parent" / "checkpoints"
    common = {"deepspeed.zero_stage": zero_stage, "lora.rank": 4, "logging.sample_keys": "true",
              "text.dropout_t5": 0.3, "train.init_from": parent, "train.init_weights": "raw"}
    root = runs / "r" / "checkpoints"
    live: dict = {}  # the adapters the straight run saved at its last step, before the resumed run replaces the tag
    dump = tmp_path / "live"  # the live fp32 adapters at each save (t2i.train.faults)
    a, b, keys_a, keys_b = straight_and_resumed(
        shards, runs, "r", common, before_resume=lambda: live.update(store.load_weights(root, store.tag_for(2 * K),
                                                                                        ema=False)),
        env={"T2I_TEST_DUMP_TRAINABLE": str(dump)})
    assert max(abs(x - y) for x, y in zip(a[K:], b)) <= 1e-6, (a, b)
    assert a[0] != a[1]
    for rank in range(2):
        assert keys_b[rank] == keys_a[rank][K:]
    run = runs / "r"
    log = (run / "train.log").read_text()
    assert "LoRA rank 4 (alpha 4): 31 modules" in log and "the base is frozen" in log
    # the final grid is drawn from the base + the EMA adapters (t2i.checkpoint.parents, the base hash checked)
    assert (run / "samples" / f"{store.tag_for(2 * K)}.png").is_file()

    tag = store.tag_for(K)
    meta = store.read_meta(root, tag)
    base = f"{parent.resolve()} (raw weights)"
    assert meta["lora"]["base"] == base
    assert len(meta["lora"]["base_sha256"]) == 64
    module = _model_file(root / tag)
    # the model file: the adapters' parameters only; no base weight and no buffer (the sin-cos positional grid
    # comes with the base: t2i.models.lora.buffers_out_of_state_dict)
    assert {k for k in module if "lora_" not in k} == set(), sorted(module)[:5]
    assert sum(1 for k in module if "lora_" in k) == 2 * 31
    # the adapters' fp32 weights from the optimizer partitions (DeepSpeed's zero_to_fp32): only lora_ keys,
    # non-empty, B trained away from its zero init
    raw = store.load_weights(root, tag, ema=False)
    assert {k for k in raw if "lora_" not in k} == set()
    raw = {k: t for k, t in raw.items() if "lora_" in k}
    assert len(raw) == 2 * 31  # 8 projections a block, the last block has no to_add_out
    assert all(t.numel() > 0 for t in raw.values())
    assert any(k.endswith("lora_B.default.weight") and t.abs().max() > 0 for k, t in raw.items())
    ema = store.load_weights(root, tag, ema=True)
    assert set(ema) == set(raw)
    if zero_stage == 2:  # the model file holds the full adapter tensors: the same as the fp32 partitions
        for k, t in raw.items():
            assert torch.equal(module[k].float(), t), k
    else:  # ZeRO-3's model file holds empty placeholders; the fp32 partitions hold the values
        assert all(module[k].numel() == 0 for k in raw)
    assert all(4 in t.shape and t.dim() == 2 for t in raw.values())
    # what the tag holds is what was live when it was saved, tensor for tensor (under ZeRO-3 each rank held a
    # partition; the saved partitions, put together, are the gathered live master weights)
    saved_live = torch.load(dump / f"step{K}.pt", weights_only=True)
    assert set(saved_live) == set(raw) and all(t.numel() > 0 for t in saved_live.values())
    for k, t in raw.items():
        assert torch.equal(saved_live[k], t), k
    # (d) the adapters saved at step 2K by the resumed run (K steps on the saved adapters) are those of the straight
    # run: saving and loading the adapters lost nothing
    resumed = store.load_weights(root, store.tag_for(2 * K), ema=False)
    assert set(resumed) == set(live) and len(live) == 2 * 31
    assert max((resumed[k] - live[k]).abs().max().item() for k in live) <= 1e-6
    assert max((resumed[k] - raw[k]).abs().max().item() for k in raw) > 0  # they did train from step K to 2K

    # (c) far smaller than a full run's tag (the parent's: same tiny model, ZeRO-2, 1 rank)
    lora_bytes, full_bytes = _tag_bytes(root / tag), _tag_bytes(parent / store.tag_for(2))
    print(f"ZeRO-{zero_stage} tag bytes: LoRA rank 4 {lora_bytes:,}, full {full_bytes:,}")
    assert lora_bytes * 4 < full_bytes, (lora_bytes, full_bytes)

    if zero_stage == 2:
        # (e) another base (the parent's EMA instead of its raw weights): refused naming both hashes
        args = tiny_train_args(shards, runs, "r")
        refused = run_t2i("train", "--nproc", 2, "--resume", root / tag, *args, "train.init_weights=ema",
                          "--force-override", check=False)
        assert refused.returncode != 0
        assert f"its LoRA adapters were trained on the base {base} (sha256 {meta['lora']['base_sha256']})" \
            in refused.stderr, refused.stderr[-2000:]
        assert f"this run's base {parent.resolve()} (ema weights) has sha256" in refused.stderr
        # another world size: refused
        refused = run_t2i("train", "--resume", root / tag, *args, check=False)
        assert refused.returncode != 0 and "resumes at that world size only" in refused.stderr, refused.stderr[-2000:]
        assert json.loads((root / tag / "meta.json").read_text())["world_size"] == 2
