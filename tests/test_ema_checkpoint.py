"""EMA arithmetic and consolidation; checkpoint pointer safety, retention, resharding helpers."""

import json
import time
from pathlib import Path

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
        torch.testing.assert_close(ema.shadow[n], expected[n].reshape(-1))  # one rank: the whole flat tensor
    assert consolidate([ema.state_dict()])["weight"].shape == (2, 3)
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
    assert consolidate([{"zero3": False, "shapes": {"w": (2, 5), "b": (3,)}, "shadow": full}])["b"].tolist() == [7.0, 8.0, 9.0]


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


def test_even_split_slices_tile_every_parameter_and_reslice_to_another_world_size():
    """The fallback layout (no DeepSpeed mapping): each rank keeps ceil(numel / world) elements of every
    flattened parameter; format-2 states record (offset, length), so they consolidate without knowing the
    layout, and a list of them re-slices into any other world size."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)                               # 15 + 3 elements: uneven over 2 and 4 ranks
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    four = [ShardedEMA(model, decay=0.9, rank=r, world=4) for r in range(4)]
    assert [e.slices["bias"] for e in four] == [(0, 1), (1, 1), (2, 1), (3, 0)]
    assert [e.slices["weight"] for e in four] == [(0, 4), (4, 4), (8, 4), (12, 3)]
    assert sum(e.nbytes() for e in four) == 18 * 4
    states = [e.state_dict() for e in four]
    assert all(s["format"] == 2 and s["source"] == "even_split" for s in states)
    assert all(torch.equal(consolidate(states)[n], expected[n]) for n in expected)
    assert all(torch.equal(consolidate(iter(states))[n], expected[n]) for n in expected)  # one at a time
    for r in range(3):
        two = ShardedEMA(torch.nn.Linear(5, 3), decay=0.5, rank=r % 2, world=2)
        two.load_state_dict(states)                             # 4 -> 2: overlaps copied
        assert torch.equal(two.shadow["weight"], expected["weight"].reshape(-1)[r % 2 * 8:][:8])
    with pytest.raises(ValueError, match="another partitioning"):
        ShardedEMA(model, decay=0.5, rank=0, world=2).load_state_dict(states[0])
    with pytest.raises(ValueError, match="missing"):
        consolidate(states[:3])
    with pytest.raises(ValueError, match="missing"):
        ShardedEMA(model, decay=0.5, rank=1, world=2).load_state_dict(states[:2])


def test_format1_states_still_load_and_consolidate():
    """Checkpoints written before format 2: ZeRO-1/2 ranks each saved the full EMA (`zero3` False), ZeRO-3
    ranks their padded partition (`zero3` True, rank = position)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    full = {n: p.detach().clone() + 1 for n, p in model.named_parameters()}
    old = {"decay": 0.9, "updates": 4, "zero3": False, "shapes": {n: tuple(t.shape) for n, t in full.items()},
           "shadow": full}
    assert all(torch.equal(consolidate([old, old])[n], full[n]) for n in full)
    for r in range(3):
        ema = ShardedEMA(model, decay=0.5, rank=r, world=3)
        ema.load_state_dict(old)
        s, k = ema.slices["weight"]
        assert ema.updates == 4 and torch.equal(ema.shadow["weight"], full["weight"].reshape(-1)[s:s + k])
        again = ShardedEMA(model, decay=0.5, rank=r, world=3)
        again.load_state_dict([old, old])                       # a list of full states: the first suffices
        assert torch.equal(again.shadow["weight"], ema.shadow["weight"])


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
        ema = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 2, rank), decay=0.9, rank=rank, world=2)
        ema.load_state_dict({"decay": 0.9, "updates": 7, "zero3": False, "shapes": ema.shapes, "shadow": expected})
        two.append({"ema": ema.state_dict()})
    state = store.consolidated_ema_state(two)
    assert state["updates"] == 7 and not state["zero3"]
    assert all(torch.equal(state["shadow"][n], expected[n]) for n in expected)
    four = []
    for rank in range(4):                                       # resumed on 4 ZeRO-3 ranks
        ema = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 4, rank), decay=0.5, rank=rank, world=4)
        ema.load_state_dict(state)
        four.append(ema.state_dict())
        assert ema.updates == 7 and ema.shadow["weight"].shape == ((4,) if rank < 3 else (3,))  # no padding kept
    assert all(torch.equal(consolidate(four)[n], expected[n]) for n in expected)
    one = ShardedEMA(torch.nn.Linear(5, 3), decay=0.5)          # ... or on one ZeRO-1/2 rank
    one.load_state_dict(state)
    assert all(torch.equal(one.shadow[n], expected[n].reshape(-1)) for n in expected)
    with pytest.raises(ValueError, match="another partitioning"):
        ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 4, 0), decay=0.5, world=4).load_state_dict(two[0]["ema"])
    # A format-1 ZeRO-3 shard (padded partition, no offsets) of this partitioning loads; its list re-slices.
    legacy = [{"decay": 0.9, "updates": 3, "zero3": True, "shapes": state["shapes"],
               "shadow": {n: torch.cat([t.reshape(-1), torch.zeros(1)])[r * (t.numel() + 1) // 2:][:(t.numel() + 1) // 2]
                          for n, t in expected.items()}} for r in range(2)]
    assert all(torch.equal(consolidate(legacy)[n], expected[n]) for n in expected)
    same = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 2, 1), decay=0.5, rank=1, world=2)
    same.load_state_dict(legacy[1])
    assert torch.equal(same.shadow["weight"], expected["weight"].reshape(-1)[8:])
    other = ShardedEMA(_zero3_like(torch.nn.Linear(5, 3), 4, 3), decay=0.5, rank=3, world=4)
    other.load_state_dict(legacy)
    assert torch.equal(other.shadow["weight"], expected["weight"].reshape(-1)[12:]) and other.updates == 3


def test_reseed_derives_the_rng_from_seed_step_and_rank():
    g = torch.Generator()
    store.reseed(g, seed=3, step=10, rank=1)
    a = (torch.rand(2, generator=g), torch.rand(2))
    store.reseed(g, seed=3, step=10, rank=1)
    assert torch.equal(a[0], torch.rand(2, generator=g)) and torch.equal(a[1], torch.rand(2))
    store.reseed(g, seed=3, step=10, rank=0)
    assert not torch.equal(a[0], torch.rand(2, generator=g))


def _resume_from_rank(rank: int, world: int, port: int, root: str, delay_s: float, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        time.sleep(delay_s)  # reads `latest` only after rank 0 has moved it
    newer = store.resume_from(Path(root), "step00000002")
    dist.barrier()  # the next collective: reached by both ranks only if resume_from kept them in step
    write_text(Path(out) / f"rank{rank}.json", json.dumps(newer))
    dist.destroy_process_group()


def test_a_resume_from_an_older_tag_moves_latest_once_and_no_rank_skips_a_barrier(tmp_path):
    """Two gloo ranks; rank 1 looks at `latest` after rank 0 moved it. Before the fix only the ranks that
    saw the old `latest` met at a barrier, and `t2i train --nproc 2 --resume <older tag>` could hang."""
    import socket

    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        write_text(root / store.tag_for(step) / "meta.json", json.dumps({"step": step}))
    write_text(root / "latest", "step00000004")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_resume_from_rank, args=(2, port, str(root), 1.0, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish: a barrier was skipped")
    assert store.latest_pointer(root) == "step00000002"
    assert json.loads((tmp_path / "rank0.json").read_text()) == ["step00000004"]  # rank 0 reports what it abandons
    assert json.loads((tmp_path / "rank1.json").read_text()) == []
