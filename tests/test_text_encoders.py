"""Frozen SD3 text encoders: equality with diffusers' StableDiffusion3Pipeline, tiny preset, dropout."""
import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from open_clip.tokenizer import bytes_to_unicode, default_bpe  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,  # noqa: E402
                          T5EncoderModel, T5Tokenizer)

from t2i.config import TextEncoderConfig  # noqa: E402
from t2i.models.text_encoders import (CLIP_G_PAD, CLIP_L_PAD, TextEncoders,  # noqa: E402
                               _tower_from_open_clip_file, clip_tokenizer, encode_clip_tower)

LONG = " ".join(f"a tiny red cube number {i} next to a blue sphere," for i in range(20))  # > 77 tokens
PROMPTS = ["a photo of a cat", "", "A RED car, driving fast!! tom &amp; jerry",
           "émigré café déjà vu 東京 🐱 don’t “quote”", LONG]
T5_TOKENS = 32


def _sd3_clip_tokenizer(d, pad_token):
    """SD3's CLIP tokenizer, built the ENV_NOTES way from open_clip's BPE file (independent of t2i)."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(d, exist_ok=True)
    json.dump({v: i for i, v in enumerate(vocab)}, open(f"{d}/vocab.json", "w"))
    open(f"{d}/merges.txt", "w").write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(vocab=f"{d}/vocab.json", merges=f"{d}/merges.txt", model_max_length=77,
                         pad_token=pad_token)


def _clip(hidden, proj, act, eos):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=proj, hidden_act=act, bos_token_id=49406, eos_token_id=eos,
                         pad_token_id=1)
    return CLIPTextModelWithProjection(cfg).eval()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3 pipeline saved as a diffusers folder and loaded back (as a user's checkpoint)."""
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    words = sorted({w for p in PROMPTS for w in p.lower().replace(",", " ").split()})
    chars = sorted({c for p in PROMPTS for c in p.lower()} - {" "})
    tok3 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
                       + [("▁" + w, -5.0) for w in words] + [(c, -8.0) for c in chars], extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, is_encoder_decoder=False,
                                 use_cache=False)).eval()
    # CLIP-L: 16 wide, quick_gelu, legacy eos id 2 (argmax pooling, like SD3's); bigG: 24 wide, gelu.
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          caption_projection_dim=32, pooled_projection_dim=36, out_channels=4),
        vae=AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                          layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(16, 16, "quick_gelu", 2), tokenizer=_sd3_clip_tokenizer(root / "v1", CLIP_L_PAD),
        text_encoder_2=_clip(24, 20, "gelu", 49407), tokenizer_2=_sd3_clip_tokenizer(root / "v2", CLIP_G_PAD),
        text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(root / "pipe")
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipe")
    te = TextEncoders(TextEncoderConfig(preset="sd3", sd3_folder=str(root / "pipe"), clip_context=77,
                                        max_t5_tokens=T5_TOKENS))
    return pipe, te


@pytest.fixture(scope="module")
def tiny():
    return TextEncoders(TextEncoderConfig(preset="tiny", seed=0))


def test_sd3_folder_encodings_equal_stable_diffusion3_pipeline(sd3):
    pipe, te = sd3
    with torch.no_grad():  # as in the pipeline's __call__
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=True, max_sequence_length=T5_TOKENS)
    ours_ctx, ours_pooled = te.encode(PROMPTS)
    assert (te.context_dim, te.pooled_dim, te.seq_len) == (48, 36, 77 + T5_TOKENS)
    assert ours_ctx.shape == ctx.shape and ours_pooled.shape == pooled.shape
    torch.testing.assert_close(ours_ctx, ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_pooled, pooled, atol=1e-5, rtol=1e-5)
    empty_ctx, empty_pooled = te.encode_empty(len(PROMPTS))  # SD3's negative prompt is ""
    torch.testing.assert_close(empty_ctx, neg_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(empty_pooled, neg_pooled, atol=1e-5, rtol=1e-5)
    assert ours_ctx[:, :77, 40:].abs().max() == 0  # CLIP channels 16 + 24 zero-padded to T5's 48


def test_built_clip_tokenizers_give_sd3_token_ids(sd3):
    """The tokenizers the tiny preset / open_clip files use are SD3's: same ids as the folder's."""
    pipe, te = sd3
    for ours, theirs in ((clip_tokenizer(CLIP_L_PAD), pipe.tokenizer), (clip_tokenizer(CLIP_G_PAD), pipe.tokenizer_2)):
        kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(ours(PROMPTS, **kw).input_ids, theirs(PROMPTS, **kw).input_ids)
    ids = te.tokenize(["fast!", LONG])
    assert ids["clip_l"][0, :5].tolist() == [49406, 1953, 256, 49407, 49407]  # CLIP-L pads with EOS
    assert ids["clip_g"][0, :5].tolist() == [49406, 1953, 0, 49407, 0]        # bigG pads with "!" = 0 (and "!" is 0)
    assert ids["clip_l"][1, -1] == ids["clip_g"][1, -1] == 49407               # truncation keeps EOS
    assert ids["t5"].shape == (2, T5_TOKENS) and ids["t5"][1, -1] == te.tok_t5.eos_token_id


@pytest.mark.parametrize("custom_text", [False, True])
def test_clip_tower_forward_matches_open_clip_models(tmp_path, custom_text):
    name = f"t2i-test-tiny-{int(custom_text)}"
    cfg = {"embed_dim": 24, "custom_text": custom_text,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    model = open_clip.create_model(name, pretrained=None).eval()
    ids = open_clip.get_tokenizer(name)(PROMPTS)
    blocks = (model.text if custom_text else model).transformer.resblocks
    seen = []
    blocks[-2].register_forward_hook(lambda m, i, o: seen.append(o))
    penultimate, pooled = encode_clip_tower(model, ids, eos_id=49407)
    torch.testing.assert_close(penultimate, seen[0])
    torch.testing.assert_close(pooled, model.encode_text(ids), atol=1e-6, rtol=1e-5)
    # an open_clip state-dict file (either layout) loads strictly into the text tower alone
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tower = _tower_from_open_clip_file(str(tmp_path / "model.pt"), name).eval()
    torch.testing.assert_close(encode_clip_tower(tower, ids, 49407)[1], pooled)


def test_tiny_preset_shapes_and_dims(tiny):
    ctx, pooled = tiny.encode(PROMPTS)
    assert (tiny.context_dim, tiny.pooled_dim, tiny.seq_len) == (64, 64, 32 + 64)
    assert ctx.shape == (len(PROMPTS), 96, 64) and pooled.shape == (len(PROMPTS), 64)
    assert ctx.dtype == pooled.dtype == torch.float32 and torch.isfinite(ctx).all()
    assert [t.shape for t in tiny.encode([])] == [(0, 96, 64), (0, 64)]
    ident = tiny.identity()
    assert ident["preset"] == "tiny" and ident["context_dim"] == 64 and ident["max_t5_tokens"] == 64


def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = TextEncoders(TextEncoderConfig(seed=0))
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(tiny.encode(PROMPTS), again.encode(PROMPTS)):
        assert torch.equal(a, b)
    other = TextEncoders(TextEncoderConfig(seed=1))
    assert not torch.equal(other.encode(PROMPTS)[1], tiny.encode(PROMPTS)[1])


def test_encoders_are_frozen_and_stay_in_eval_mode(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    ctx, pooled = tiny.encode(PROMPTS[:2])
    assert not ctx.requires_grad and not pooled.requires_grad
    torch.testing.assert_close(tiny.encode(PROMPTS[:2])[0], ctx, atol=0, rtol=0)  # no T5 dropout


def _dropped(tiny, ctx, pooled, encoder):
    """Which rows of (ctx, pooled) carry the empty-caption encoding in `encoder`'s part."""
    rows, cols, pcols = tiny._parts()[encoder]
    e_ctx, e_pooled = tiny.encode_empty(1)
    hit = (ctx[:, rows, cols] == e_ctx[:, rows, cols]).flatten(1).all(1)
    if pcols is not None:
        assert torch.equal(hit, (pooled[:, pcols] == e_pooled[:, pcols]).all(1))
    return hit


@pytest.mark.parametrize("encoder,key", [(0, "dropout_clip_l"), (1, "dropout_clip_g"), (2, "dropout_t5")])
def test_dropout_prob_one_replaces_only_that_encoders_part(tiny, encoder, key):
    caps = PROMPTS[:1] + PROMPTS[2:]  # no empty caption
    ctx, pooled = tiny.encode(caps)
    e_ctx, e_pooled = tiny.encode_empty(len(caps))
    tiny.cfg.__dict__[key] = 1.0
    try:
        d_ctx, d_pooled = tiny.encode(caps, generator=torch.Generator().manual_seed(0), dropout=True)
    finally:
        tiny.cfg.__dict__[key] = 0.0
    for k, (rows, cols, pcols) in enumerate(tiny._parts()):
        src_ctx, src_pooled = (e_ctx, e_pooled) if k == encoder else (ctx, pooled)
        assert torch.equal(d_ctx[:, rows, cols], src_ctx[:, rows, cols])
        assert not torch.equal(ctx[:, rows, cols], e_ctx[:, rows, cols])  # the check can tell them apart
        if pcols is not None:
            assert torch.equal(d_pooled[:, pcols], src_pooled[:, pcols])


def test_dropout_prob_zero_changes_nothing(tiny):
    ctx, pooled = tiny.encode(PROMPTS)
    d_ctx, d_pooled = tiny.encode(PROMPTS, generator=torch.Generator().manual_seed(0), dropout=True)
    assert torch.equal(ctx, d_ctx) and torch.equal(pooled, d_pooled)


def test_dropout_half_drops_half_independently_and_reproducibly(tiny):
    te = TextEncoders(TextEncoderConfig(dropout_clip_l=0.5, dropout_clip_g=0.5, dropout_t5=0.5))
    ctx, pooled = te.encode(PROMPTS[:1] + PROMPTS[2:])
    ctx, pooled = ctx.repeat(500, 1, 1), pooled.repeat(500, 1)  # 2000 cached encodings
    runs = [te.apply_caption_dropout(ctx, pooled, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    drops = torch.stack([_dropped(te, *runs[0], k) for k in range(3)], 1).float()
    assert ((drops.mean(0) - 0.5).abs() < 0.05).all()
    assert abs((drops[:, 0] * drops[:, 1]).mean() - 0.25) < 0.05  # independent per encoder
    # encode(dropout=True) is encode() followed by the same draws
    caps = PROMPTS[:3]
    a = te.encode(caps, generator=torch.Generator().manual_seed(3), dropout=True)
    b = te.apply_caption_dropout(*te.encode(caps), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs,key", [
    ({"preset": "sdxl"}, "preset"),
    ({"dropout_t5": 1.5}, "dropout_t5"),
    ({"dropout_clip_l": -0.1}, "dropout_clip_l"),
    ({"dropout_clip_g": "0.1"}, "dropout_clip_g"),
    ({"dtype": "fp32"}, "dtype"),
    ({"max_t5_tokens": 0}, "max_t5_tokens"),
    ({"preset": "sd3"}, "clip_l"),
    ({"preset": "sd3", "clip_l": "/nonexistent/l.pt", "clip_g": "/x", "t5": "/y"}, "clip_l"),
    ({"preset": "sd3", "sd3_folder": "/nonexistent/sd3"}, "sd3_folder"),
    ({"preset": "tiny", "t5": "/some/t5"}, "t5"),
])
def test_bad_config_raises_value_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TextEncoders(TextEncoderConfig(**kwargs))


def test_sd3_clip_context_must_match_the_checkpoint(sd3):
    _, te = sd3
    with pytest.raises(ValueError, match="clip_context"):
        TextEncoders(TextEncoderConfig(preset="sd3", sd3_folder=te.cfg.sd3_folder, clip_context=32))


def test_sd3_folder_in_bfloat16_matches_the_pipeline_in_bfloat16(sd3):
    pipe, te = sd3
    folder = te.cfg.sd3_folder
    te16 = TextEncoders(TextEncoderConfig(preset="sd3", sd3_folder=folder, clip_context=77,
                                          max_t5_tokens=T5_TOKENS, dtype="bfloat16"))
    pipe16 = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in te16.t5.parameters()} == {p.dtype for p in pipe16.text_encoder_3.parameters()}
    with torch.no_grad():  # (with grad enabled, CPU SDPA picks another kernel: bf16 rounding differs)
        ctx, _, pooled, _ = pipe16.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                 device=torch.device("cpu"), max_sequence_length=T5_TOKENS)
    ours_ctx, ours_pooled = te16.encode(PROMPTS)
    assert ours_ctx.dtype == ours_pooled.dtype == torch.bfloat16
    torch.testing.assert_close(ours_ctx, ctx)  # bf16 default tolerances; bit-identical on the dev VM
    torch.testing.assert_close(ours_pooled, pooled)
