"""Frozen SD3 text conditioning: CLIP-L and OpenCLIP-bigG through open_clip, T5 through transformers.

Assembled exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` does (clip_skip=None):

    pooled  = [ proj_L(ln(h_L)[eos]) | proj_G(ln(h_G)[eos]) ]                 [B, eL + eG]
    context = [ pad_to_d_t5( [ h_L^(-2) | h_G^(-2) ] ) ; t5(last hidden) ]     [B, C + T, d_t5]

h^(-2) is the output of the second-to-last CLIP block without the final LayerNorm (HF's
``hidden_states[-2]``); ``eos`` is the first <|endoftext|>; C = clip_context (77 for SD3), T =
max_t5_tokens (the SD3 pipeline's default is 256). Tokenisation is the pipeline's: HF
``CLIPTokenizer`` padding with <|endoftext|> (CLIP-L) and with "!" (bigG, id 0, a special token so
every "!" in a caption is id 0 as well), truncating to BOS + 75 tokens + EOS; T5 pads to T and
truncates keeping </s>. Caption dropout replaces an encoder's slice by its encoding of "" (SD3's
negative prompt), so training's unconditional branch is what sampling's CFG uses.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import Optional

import torch
from open_clip.factory import get_model_config, load_state_dict as load_open_clip_state_dict
from open_clip.model import _build_text_tower  # open_clip's own text_cfg -> TextTransformer builder
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import (AutoTokenizer, ByT5Tokenizer, CLIPTextModelWithProjection, CLIPTokenizer,
                          T5Config, T5EncoderModel)

from t2i import caption_dropout
from t2i.config import TextEncoderConfig
from t2i.errors import ConfigError
from t2i.sd3_folder import is_placeholder, placeholder_message, require, text_parts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CLIP_L_PAD, CLIP_G_PAD = "<|endoftext|>", "!"  # SD3's tokenizer / tokenizer_2 pad tokens
# Tiny preset: open_clip text_cfg dicts (random init) and a byte-level T5 (ByT5 vocab = 384).
TINY_CLIP = dict(vocab_size=49408, width=32, heads=2, layers=2)
TINY_EMBED_DIM = 32
TINY_T5 = dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, dropout_rate=0.0, is_encoder_decoder=False,
               use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


# ---------------------------------------------------------------- tokenizers

@functools.lru_cache(maxsize=None)
def _bpe_vocab_merges() -> tuple[dict, tuple]:
    """CLIP's BPE vocabulary, read from the file open_clip ships (no download)."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = tuple(tuple(m.split()) for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str, context: int = 77) -> CLIPTokenizer:
    """HF CLIPTokenizer over open_clip's BPE, configured like SD3's tokenizer (pad <|endoftext|>)
    or tokenizer_2 (pad "!"). Unlike open_clip's SimpleTokenizer it applies no ftfy/html cleaning,
    which is what SD3's pipeline feeds its encoders."""
    vocab, merges = _bpe_vocab_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=context)


# ---------------------------------------------------------------- open_clip towers

def hf_clip_to_open_clip(sd: dict) -> dict:
    """Convert an HF CLIPTextModelWithProjection state dict into open_clip's TextTransformer layout."""
    out, qkv = {}, {}
    for key, v in sd.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_ids":
            continue
        if k == "text_projection.weight":                      # Linear [e, w] -> Parameter [w, e]
            out["text_projection"] = v.t().contiguous()
            continue
        k = (k.replace("embeddings.token_embedding.weight", "token_embedding.weight")
             .replace("embeddings.position_embedding.weight", "positional_embedding")
             .replace("final_layer_norm.", "ln_final.")
             .replace("encoder.layers.", "transformer.resblocks.")
             .replace(".layer_norm1.", ".ln_1.").replace(".layer_norm2.", ".ln_2.")
             .replace(".mlp.fc1.", ".mlp.c_fc.").replace(".mlp.fc2.", ".mlp.c_proj.")
             .replace(".self_attn.out_proj.", ".attn.out_proj."))
        for p in ("q", "k", "v"):                                # q/k/v -> fused in_proj
            if f".self_attn.{p}_proj." in k:
                block, kind = k.split(f".self_attn.{p}_proj.")
                qkv.setdefault((block, kind), {})[p] = v
                break
        else:
            out[k] = v
    for (block, kind), parts in qkv.items():
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _tower_from_hf(folder: str, dtype: torch.dtype, device="cpu") -> torch.nn.Module:
    """Build an open_clip TextTransformer with the shapes of an HF CLIP text config and load its
    converted weights strictly. One copy of the weights is ever held: the HF model is read in the
    target dtype, the tower is built on the meta device and takes over the HF tensors (assign=True)."""
    hf = CLIPTextModelWithProjection.from_pretrained(folder, dtype=dtype, device_map=str(device))
    c = hf.config
    if c.hidden_act not in ("quick_gelu", "gelu") or c.intermediate_size % c.hidden_size:
        raise ValueError(f"sd3_folder: unsupported CLIP text config in {folder} "
                         f"(hidden_act={c.hidden_act}, intermediate_size={c.intermediate_size})")
    text_cfg = dict(context_length=c.max_position_embeddings, vocab_size=c.vocab_size,
                    width=c.hidden_size, heads=c.num_attention_heads, layers=c.num_hidden_layers,
                    mlp_ratio=c.intermediate_size // c.hidden_size,
                    norm_kwargs={"eps": c.layer_norm_eps})
    with torch.device("meta"):
        tower = _build_text_tower(c.projection_dim, text_cfg, quick_gelu=c.hidden_act == "quick_gelu")
    tower.load_state_dict(hf_clip_to_open_clip(hf.state_dict()), strict=True, assign=True)
    del hf
    tower.attn_mask = tower.build_causal_mask().to(device)  # the one buffer not in the state dict (was on meta)
    return tower


def _tower_from_open_clip_file(path: str, model_name: str) -> torch.nn.Module:
    """Text tower of an open_clip model config, loaded (strictly) from a full-model state dict."""
    cfg = get_model_config(model_name)
    tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    sd = load_open_clip_state_dict(path)
    wanted = set(tower.state_dict())
    sd = {k.removeprefix("text."): v for k, v in sd.items() if k.removeprefix("text.") in wanted}
    tower.load_state_dict(sd, strict=True)
    return tower


def encode_clip_tower(model: torch.nn.Module, ids: torch.Tensor, eos_id: int):
    """Run an open_clip text tower block by block -> (penultimate [B, L, w], pooled [B, e]).

    ``model`` is a TextTransformer, a CLIP (text parts on the model) or a CustomTextCLIP (``.text``).
    Pooling is at the first EOS (HF's rule; equals open_clip's argmax for CLIP's vocabulary)."""
    t = getattr(model, "text", model)
    n = ids.shape[1]
    x = t.token_embedding(ids) + t.positional_embedding[:n]
    mask = t.attn_mask[:n, :n].to(x.dtype)
    blocks = t.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x, attn_mask=mask)
    penultimate = x
    x = t.ln_final(blocks[-1](x, attn_mask=mask))
    pooled = x[torch.arange(len(ids), device=ids.device), (ids == eos_id).int().argmax(-1)]
    proj = t.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    return penultimate, pooled


# ---------------------------------------------------------------- the module

def check_paths(cfg: TextEncoderConfig) -> None:
    """Every local path the sd3 preset reads, present: text.sd3_folder with the subfolders it is read for
    (each model's config.json included), and explicit clip_l / clip_g / t5 paths; placeholders refused.
    Raises ConfigError naming the key and the missing part."""
    if cfg.sd3_folder:
        require("text.sd3_folder", cfg.sd3_folder, text_parts(cfg), files=True)
    for key in ("clip_l", "clip_g", "t5"):
        path = getattr(cfg, key)
        if path and is_placeholder(path):
            raise ConfigError(placeholder_message(f"text.{key}", path))
        if path and not os.path.exists(path):
            raise ConfigError(f"text.{key}={path}: not found")


class TextEncoders(torch.nn.Module):
    """Frozen CLIP-L + bigG + T5. Never trains: no parameter requires grad, ``train()`` is a no-op."""

    def __init__(self, cfg: TextEncoderConfig, device="cpu"):
        """`device`: where pretrained weights are read to, in their target dtype, without a host copy."""
        super().__init__()
        self.cfg = cfg.validate()
        C = cfg.clip_context
        if cfg.preset == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                text_cfg = dict(TINY_CLIP, context_length=C)
                self.clip_l = _build_text_tower(TINY_EMBED_DIM, text_cfg, quick_gelu=True)
                self.clip_g = _build_text_tower(TINY_EMBED_DIM, text_cfg, quick_gelu=False)
                self.t5 = T5EncoderModel(T5Config(**TINY_T5)).to(DTYPES[cfg.dtype])
            self.tok_l, self.tok_g = clip_tokenizer(CLIP_L_PAD, C), clip_tokenizer(CLIP_G_PAD, C)
            self.tok_t5 = ByT5Tokenizer()
        else:
            folder = cfg.sd3_folder
            dtype = DTYPES[cfg.dtype]
            check_paths(cfg)  # before any from_pretrained: a missing part is one line, not a hub lookup
            self.clip_l = (_tower_from_open_clip_file(cfg.clip_l, "ViT-L-14-quickgelu") if cfg.clip_l
                           else _tower_from_hf(os.path.join(folder, "text_encoder"), dtype, device))
            self.clip_g = (_tower_from_open_clip_file(cfg.clip_g, "ViT-bigG-14") if cfg.clip_g
                           else _tower_from_hf(os.path.join(folder, "text_encoder_2"), dtype, device))
            t5_model, t5_tok = ((cfg.t5, cfg.t5) if cfg.t5 else
                                (os.path.join(folder, "text_encoder_3"), os.path.join(folder, "tokenizer_3")))
            # Loaded in cfg.dtype by transformers exactly as the pipeline gets it (under float16 it
            # keeps T5's `wo` layers in fp32), so T5 is not cast again below.
            self.t5 = T5EncoderModel.from_pretrained(t5_model, dtype=DTYPES[cfg.dtype], device_map=str(device))
            self.tok_t5 = AutoTokenizer.from_pretrained(t5_tok)
            # The checkpoint's own CLIP tokenizers when the folder has them, else SD3's settings.
            self.tok_l, self.tok_g = (
                CLIPTokenizer.from_pretrained(os.path.join(folder, sub))
                if folder and os.path.isdir(os.path.join(folder, sub)) else clip_tokenizer(pad, C)
                for sub, pad in (("tokenizer", CLIP_L_PAD), ("tokenizer_2", CLIP_G_PAD)))
            for name, tower in (("clip_l", self.clip_l), ("clip_g", self.clip_g)):
                if tower.positional_embedding.shape[0] != C:
                    raise ValueError(f"clip_context: {C} but the {name} tower was trained with "
                                     f"{tower.positional_embedding.shape[0]} positions")
        self.clip_l.to(DTYPES[cfg.dtype])
        self.clip_g.to(DTYPES[cfg.dtype])
        self.requires_grad_(False).eval()
        self._empty: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ---- dims
    @property
    def context_dim(self) -> int:
        """Width of the token sequence = SD3Transformer2DModel.joint_attention_dim."""
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector = SD3Transformer2DModel.pooled_projection_dim."""
        return self.clip_l.text_projection.shape[1] + self.clip_g.text_projection.shape[1]

    @property
    def seq_len(self) -> int:
        return self.cfg.clip_context + self.cfg.max_t5_tokens

    def train(self, mode: bool = True) -> "TextEncoders":
        return super().train(False)  # frozen: T5 dropout etc. must never switch on

    def identity(self) -> dict:
        """What the encodings depend on (cache keys). Caption dropout is applied after caching."""
        c = self.cfg

        def real(path):
            return os.path.realpath(path) if path else None
        return {"encoders": "sd3-clip_l+clip_g+t5", "preset": c.preset, "sd3_folder": real(c.sd3_folder),
                "clip_l": real(c.clip_l), "clip_g": real(c.clip_g), "t5": real(c.t5),
                "seed": c.seed if c.preset == "tiny" else None, "clip_context": c.clip_context,
                "max_t5_tokens": c.max_t5_tokens, "context_dim": self.context_dim,
                "pooled_dim": self.pooled_dim, "seq_len": self.seq_len, "dtype": c.dtype,
                "t5_padding": c.t5_padding}

    # ---- encoding
    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids exactly as StableDiffusion3Pipeline builds them."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not a str")
        clip = dict(padding="max_length", max_length=self.cfg.clip_context, truncation=True,
                    return_tensors="pt")
        return {"clip_l": self.tok_l(captions, **clip).input_ids,
                "clip_g": self.tok_g(captions, **clip).input_ids,
                "t5": self.tok_t5(captions, padding="max_length", max_length=self.cfg.max_t5_tokens,
                                  truncation=True, add_special_tokens=True, return_tensors="pt").input_ids}

    @torch.no_grad()
    def encode(self, captions: list[str], generator: Optional[torch.Generator] = None,
               dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (context [B, seq_len, context_dim], pooled [B, pooled_dim]).
        With ``dropout``, apply caption dropout (see ``apply_caption_dropout``)."""
        if len(captions) == 0:
            return self.encode_empty(0)
        ids = {k: v.to(self.t5.device) for k, v in self.tokenize(captions).items()}
        pen_l, pool_l = encode_clip_tower(self.clip_l, ids["clip_l"], self.tok_l.eos_token_id)
        pen_g, pool_g = encode_clip_tower(self.clip_g, ids["clip_g"], self.tok_g.eos_token_id)
        t5 = self.t5(input_ids=ids["t5"]).last_hidden_state
        if self.cfg.t5_padding == "zero":  # positions after the first </s> -> 0
            keep = torch.arange(t5.shape[1], device=t5.device) < self.t5_lengths(ids["t5"])[:, None]
            t5 = t5.masked_fill(~keep[..., None], 0)
        clip = torch.cat([pen_l, pen_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        context, pooled = torch.cat([clip, t5], dim=-2), torch.cat([pool_l, pool_g], dim=-1)
        if dropout:
            context, pooled = self.apply_caption_dropout(context, pooled, generator)
        return context, pooled

    def t5_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Real T5 token count per row of ``ids`` [B, T]: up to and including the first </s>
        (T when a row has none)."""
        eos = ids == self.tok_t5.eos_token_id
        n = eos.int().argmax(-1) + 1
        return torch.where(eos.any(-1), n, torch.full_like(n, ids.shape[1]))

    @torch.no_grad()
    def encode_empty(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n copies of the encoding of "" (the SD3 pipeline's negative prompt), cached."""
        device, dtype = self.t5.device, self.t5.dtype
        if self._empty is None or self._empty[0].device != device or self._empty[0].dtype != dtype:
            self._empty = self.encode([""])
        context, pooled = self._empty
        return context.expand(n, -1, -1).clone(), pooled.expand(n, -1).clone()

    def _parts(self):
        """(context rows, context channels, pooled channels) of CLIP-L, bigG and T5."""
        C, wl = self.cfg.clip_context, self.clip_l.width
        el, wg = self.clip_l.text_projection.shape[1], self.clip_g.width
        return ((slice(0, C), slice(0, wl), slice(0, el)),
                (slice(0, C), slice(wl, wl + wg), slice(el, None)),
                (slice(C, None), slice(None), None))

    @torch.no_grad()
    def apply_caption_dropout(self, context: torch.Tensor, pooled: torch.Tensor,
                              generator: Optional[torch.Generator] = None):
        """Replace the dropped encoders' parts (CLIP-L, bigG, T5) by their encoding of "": per sample,
        all three together with probability ``dropout_all``, otherwise each independently with its
        ``dropout_<encoder>`` probability (t2i.caption_dropout.draw_masks decides, drawing B x 4
        uniforms from ``generator`` on every call). A fully dropped sample equals ``encode_empty``,
        the unconditional input of CFG. Works on fresh or cached encodings alike; returns new tensors."""
        drop = caption_dropout.draw_masks(len(context), *caption_dropout.config_probabilities(self.cfg),
                                          generator).to(context.device)
        empty_ctx, empty_pooled = self.encode_empty(1)
        context, pooled = context.clone(), pooled.clone()
        for k, (rows, cols, pcols) in enumerate(self._parts()):
            m = drop[:, k]
            context[m, rows, cols] = empty_ctx[0, rows, cols].to(context.dtype)
            if pcols is not None:
                pooled[m, pcols] = empty_pooled[0, pcols].to(pooled.dtype)
        return context, pooled
