"""`t2i train data.shards=<yours>` needs no other edit: the default config's shapes-only settings
(held-out shapes validation, shapes sample prompts, live shapes GenEval) follow the data, decided by
the samples' content (t2i.data.peek), each change one log line; shapes data keeps all of them."""

import json
import logging

import pytest

from conftest import png_bytes, write_sample_shards, write_tar
from t2i.config import load_config
from t2i.data.peek import is_shapes_meta, peek
from t2i.data.shapes import make_sample
from t2i.data.writers import write_shapes_shards
from t2i.errors import DataError
from t2i.train.plan import plan_training

SHAPES_PROMPTS = load_config().sample.prompts


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def start(*overrides, tmp):
    return plan_training(None, [f"run.output_dir={tmp / 'runs'}", "run.name=r", *overrides])


def test_your_data_at_the_default_path_turns_the_shapes_settings_off_one_line_each(here):
    """The user's own images written where the default config looks (data/shapes/shapes-*.tar): the
    rule reads the samples, not the path."""
    (here / "data" / "shapes").mkdir(parents=True)
    write_sample_shards(here / "data" / "shapes", 8, 3, prefix="shapes")
    cfg, notes = start(tmp=here)
    assert cfg.data.shards == "data/shapes/shapes-{000000..000007}.tar"
    assert cfg.validation.shards is None
    assert cfg.sample.prompts == ["caption 0 0", "caption 0 1", "caption 0 2"]  # the first shard's captions
    assert cfg.sample.geneval_per_tag == 0
    info = [m for lv, m in notes if lv == logging.INFO]
    what = "data.shards=data/shapes/shapes-{000000..000007}.tar is not the shapes domain"
    assert info == [
        f"validation off: {what}, and validation.shards is the shapes held-out set; set "
        f"validation.shards=<held-out shards of your data> for a fixed-sigma validation loss",
        f"sample prompts: {what}; the sample grids use 3 caption(s) of its first shard instead of the shapes "
        f"prompts (set sample.prompts=[...] to choose)",
        f"live GenEval off: {what} and sample.geneval_per_tag scores shapes prompts with the shapes detector; "
        f"evaluate your checkpoints with `t2i eval`",
    ]


def test_your_own_validation_and_prompts_are_kept(here):
    (here / "mine").mkdir()
    shards = write_sample_shards(here / "mine", 3, 4, prefix="images")
    cfg, notes = start(f"data.shards={shards[0]}::{shards[1]}", f"validation.shards={shards[2]}",
                       "sample.prompts=[a photo of my dog]", tmp=here)
    assert cfg.validation.shards == shards[2] and cfg.sample.prompts == ["a photo of my dog"]
    assert [m.split(":")[0] for _, m in notes if "not the shapes domain" in m] == ["live GenEval off"]
    cfg, notes = start(f"data.shards={shards[0]}", "sample.geneval_per_tag=1", "sample.every=2", tmp=here)
    assert cfg.sample.geneval_per_tag == 1  # asked for with another count than the default's: kept, warned
    warned = [m for lv, m in notes if lv == logging.WARNING and m.startswith("sample.geneval_per_tag=1 kept as set")]
    assert len(warned) == 1 and warned[0].endswith(
        "images-000000.tar is not the shapes domain: the live GenEval scores shapes prompts with the shapes detector")


def test_shapes_data_elsewhere_keeps_every_shapes_setting(here):
    write_shapes_shards(here / "copy", 12, samples_per_shard=6, size=32, progress=False)
    write_shapes_shards(here / "data" / "shapes-val", 4, samples_per_shard=2, size=32, prefix="shapes-val",
                        seed=1, progress=False)
    cfg, notes = start(f"data.shards={here / 'copy'}", tmp=here)
    default = load_config()
    assert cfg.validation.shards == default.validation.shards == "data/shapes-val/shapes-val-{000000..000001}.tar"
    assert cfg.sample.prompts == SHAPES_PROMPTS and cfg.sample.geneval_per_tag == default.sample.geneval_per_tag == 4
    assert not [m for _, m in notes if "shapes domain" in m]


def test_a_missing_validation_shard_names_its_key(here):
    (here / "mine").mkdir()
    shards = write_sample_shards(here / "mine", 1, 4)
    with pytest.raises(DataError) as err:
        start(f"data.shards={shards[0]}", f"validation.shards={here / 'held-{0..1}.tar'}", tmp=here)
    assert str(err.value).startswith("validation.shards: 2 shard(s) not found: [")


def test_the_shapes_domain_is_read_from_the_json_not_the_caption(tmp_path):
    image, caption, meta = make_sample(0, size=32)
    assert is_shapes_meta(meta) and not is_shapes_meta({"width": 32, "height": 32, "source": "a.png"})
    write_tar(tmp_path / "look-alike.tar", [("k.png", png_bytes((255, 0, 0))), ("k.txt", caption.encode()),
                                            ("k.json", json.dumps({"source": "k.png"}).encode())])
    look = peek(str(tmp_path / "look-alike.tar"))
    assert not look.shapes and look.captions == [caption]
    write_tar(tmp_path / "shapes.tar", [("k.png", png_bytes((255, 0, 0))), ("k.txt", caption.encode()),
                                        ("k.json", json.dumps(meta).encode())])
    assert peek(str(tmp_path / "shapes.tar")).shapes
