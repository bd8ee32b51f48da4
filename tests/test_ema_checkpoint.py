"""EMA arithmetic and consolidation; checkpoint pointer safety."""

import pytest
import torch

from t2i import checkpoint
from t2i.ema import ShardedEMA, consolidate


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
    assert checkpoint.latest_tag(root) is None
    (root / "step00000002").mkdir()
    (root / "step00000002" / "meta.json").write_text("{}")
    checkpoint.atomic_write_text(root / "latest", "step00000002")
    (root / "step00000004").mkdir()  # a save that died before meta.json
    assert checkpoint.latest_tag(root) == "step00000002"
    assert checkpoint.incomplete_tags(root) == ["step00000004"]
    checkpoint.atomic_write_text(root / "latest", "step00000004")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.latest_tag(root)
    assert not list(root.glob(".latest*"))  # no temp files left behind
