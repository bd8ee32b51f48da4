"""EMA arithmetic and consolidation; checkpoint pointer safety, retention, resharding helpers."""

import json

import pytest
import torch

from t2i.checkpoint import store
from t2i.errors import CheckpointError
from t2i.io import write_text
from t2i.checkpoint.ema import ShardedEMA, consolidate


def test_ema_follows_the_warmed_up_decay_formula():
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n_update in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        d = min(0.9, (1 + n_update) / (10 + n_update))
        assert ema.update(model) == pytest.approx(d)
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])
    restored = ShardedEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5 and all(torch.equal(restored.shadow[n], ema.shadow[n]) for n in expected)


def test_consolidate_rebuilds_zero3_partitions_in_rank_order():
    full = {"w": torch.arange(10.0).view(2, 5), "b": torch.tensor([7.0, 8.0, 9.0])}
    states = []
    for rank in range(2):  # ZeRO-3: each rank holds ceil(numel / 2) elements of the flat tensor, zero-padded
        shard = {}
        for n, t in full.items():
            flat = torch.cat([t.flatten(), torch.zeros(1)])[: 2 * ((t.numel() + 1) // 2)]
            size = flat.numel() // 2
            shard[n] = flat[rank * size:(rank + 1) * size]
        states.append({"zero3": True, "shapes": {n: tuple(t.shape) for n, t in full.items()}, "shadow": shard})
    out = consolidate(states)
    assert all(torch.equal(out[n], full[n]) for n in full)
    assert consolidate([{"zero3": False, "shapes": {}, "shadow": full}])["b"].tolist() == [7.0, 8.0, 9.0]


def test_latest_never_points_to_an_incomplete_tag(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert store.latest_tag(root) is None
    (root / "step00000002").mkdir()
    (root / "step00000002" / "meta.json").write_text("{}")
    write_text(root / "latest", "step00000002", fsync=True)
    (root / "step00000004").mkdir()  # a save that died before meta.json
    assert store.latest_tag(root) == "step00000002"
    assert store.incomplete_tags(root) == ["step00000004"]
    write_text(root / "latest", "step00000004", fsync=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        store.latest_tag(root)
    assert not list(root.glob(".latest*"))  # no temp files left behind


def _fake_tag(root, step, complete=True):
    tag = store.tag_for(step)
    (root / tag / "t2i").mkdir(parents=True)
    if complete:
        (root / tag / "meta.json").write_text(json.dumps({"step": step, "tag": tag}))
    return tag


def test_keep_last_deletes_the_oldest_complete_tags_but_never_latest_or_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (2, 4, 6, 8, 10):
        _fake_tag(root, step)
    _fake_tag(root, 12, complete=False)                         # a save in progress / killed
    (root / ".trash-step00000000-1").mkdir()                    # an interrupted earlier delete
    write_text(root / "latest", "step00000004", fsync=True)  # e.g. resumed from an older tag
    assert store.prune(root, keep_last=0) == []            # 0 keeps all (but clears the trash)
    assert not (root / ".trash-step00000000-1").exists()
    assert store.complete_tags(root) == ["step00000002", "step00000004", "step00000006", "step00000008",
                                              "step00000010"]
    assert store.prune(root, keep_last=2) == ["step00000002", "step00000006"]
    assert store.complete_tags(root) == ["step00000004", "step00000008", "step00000010"]
    assert store.incomplete_tags(root) == ["step00000012"]
    assert store.latest_tag(root) == "step00000004"
    assert not list(root.glob(".trash-*"))
    assert store.prune(root, keep_last=2) == []            # nothing more to delete


def test_an_incomplete_tag_folder_is_refused_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    _fake_tag(root, 2)
    write_text(root / "latest", "step00000002", fsync=True)
    tag = _fake_tag(root, 4, complete=False)
    assert store.resolve(tmp_path) == (root, "step00000002")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        store.resolve(root / tag)


def test_data_state_for_another_world_size_restarts_the_furthest_epoch_and_keeps_the_total_counts():
    old = [{"num_workers": 2, "next_worker": 1,
            "workers": {0: {"epoch": 1, "index": 7, "counts": {"image": 1, "caption": 0, "read": 0, "good": 20}},
                        1: {"epoch": 2, "index": 3, "counts": {"image": 0, "caption": 2, "read": 0, "good": 21}}}},
           {"num_workers": 2, "next_worker": 0,
            "workers": {0: {"epoch": 1, "index": 9, "counts": {"image": 0, "caption": 0, "read": 1, "good": 22}}}}]
    new0, new2 = (store.reshard_data_state(old, rank) for rank in (0, 2))
    assert new0["num_workers"] == new2["num_workers"] == 2 and new0["next_worker"] == 0
    assert [(w["epoch"], w["index"]) for w in new0["workers"].values()] == [(2, 0), (2, 0)]
    assert new0["workers"][0]["counts"] == {"caption": 2, "good": 63, "image": 1, "read": 1}
    assert new0["workers"][1]["counts"] == new2["workers"][0]["counts"] == {"caption": 0, "good": 0, "image": 0,
                                                                            "read": 0}


def _zero3_like(model, world, rank):
    """Give a model's parameters DeepSpeed ZeRO-3 attributes: ds_tensor = this rank's padded flat slice."""
    for p in model.parameters():
        k = -(-p.numel() // world)
        flat = torch.cat([p.detach().reshape(-1), torch.zeros(k * world - p.numel())])
        p.ds_shape, p.ds_tensor = p.shape, flat[rank * k:(rank + 1) * k].clone()
    return model


def test_a_consolidated_ema_loads_into_any_zero3_world_size_and_consolidates_back():
    torch.manual_seed(0)
    full = torch.nn.Linear(5, 3)                                # 15 + 3 elements: uneven over 2 and 4 ranks
    expected = {n: p.detach().clone() for n, p in full.named_parameters()}
    two = []
    for rank in range(2):                                       # saved by 2 ZeRO-3 ranks
        ema = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 2, rank), decay=0.9)
        ema.rank = rank
        ema.load_state_dict({"decay": 0.9, "updates": 7, "zero3": False, "shapes": ema.shapes, "shadow": expected})
        two.append({"ema": ema.state_dict()})
    state = store.consolidated_ema_state(two)
    assert state["updates"] == 7 and not state["zero3"]
    assert all(torch.equal(state["shadow"][n], expected[n]) for n in expected)
    four = []
    for rank in range(4):                                       # resumed on 4 ZeRO-3 ranks
        ema = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 4, rank), decay=0.5)
        ema.rank = rank
        ema.load_state_dict(state)
        four.append(ema.state_dict())
        assert ema.updates == 7 and ema.shadow["weight"].shape == (4,)
    assert all(torch.equal(consolidate(four)[n], expected[n]) for n in expected)
    one = ShardedEMA(torch.nn.Linear(5, 3), decay=0.5)          # ... or on one ZeRO-1/2 rank
    one.load_state_dict(state)
    assert all(torch.equal(one.shadow[n], expected[n]) for n in expected)
    with pytest.raises(ValueError, match="another partitioning"):
        ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 4, 0), decay=0.5).load_state_dict(two[0]["ema"])


def test_reseed_derives_the_rng_from_seed_step_and_rank():
    g = torch.Generator()
    store.reseed(g, seed=3, step=10, rank=1)
    a = (torch.rand(2, generator=g), torch.rand(2))
    store.reseed(g, seed=3, step=10, rank=1)
    assert torch.equal(a[0], torch.rand(2, generator=g)) and torch.equal(a[1], torch.rand(2))
    store.reseed(g, seed=3, step=10, rank=0)
    assert not torch.equal(a[0], torch.rand(2, generator=g))
