"""The training run's checkpoints: when to save, what goes in, how a run continues (the weights a
post-training run starts from and a LoRA run's base: t2i.checkpoint.base). The loop calls `save(step, ...)` after every step and
this class decides (cadence, last step, not in a non-finite streak, not twice for one step); the
format itself is t2i.checkpoint.store's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from t2i.checkpoint import store
from t2i.config import Config, to_dict
from t2i.errors import CheckpointError

log = logging.getLogger("t2i")


class Checkpointer:
    """Saves and restores engine + EMA + RNG + data position + skip count under <run>/checkpoints."""

    def __init__(self, root: Path, cfg: Config, engine, ema, generator, world: int, save_last: bool = True,
                 force: bool = False, lora: dict | None = None):
        """`lora` (a LoRA run, lora.rank > 0): {"base", "base_sha256"} of the frozen base (t2i.checkpoint.base.lora_base). The
        tags then leave the base out (DeepSpeed's exclude_frozen_parameters), meta.json records it, and a
        resume loads the adapters non-strictly over the base already in the model, refusing another base."""
        self.root, self.cfg, self.engine, self.ema, self.generator = root, cfg, engine, ema, generator
        self.world, self.save_last, self.force, self.lora = world, save_last, force, lora
        self.last_saved: int | None = None
        self.after_rank_files = None  # a test hook may pause a rank mid-save here (t2i.train.faults)

    def save(self, step: int, loader, skipped: int, *, last_step: bool = False, healthy: bool = True,
             force: bool = False) -> bool:
        """Save if due: `force` (a stop signal), the last step (unless save_last is off), or every
        train.ckpt_every steps while no non-finite streak runs. Never twice for one step. Collective."""
        due = force or (last_step and self.save_last) or (step % self.cfg.train.ckpt_every == 0 and healthy)
        if not due or self.last_saved == step:
            return self.last_saved == step
        client = {"step": step, "rng": store.rng_state(self.generator), "data": loader.state_dict(),
                  "ema": self.ema.state_dict(), "skipped_nonfinite": skipped}
        meta = {"world_size": self.world, "zero_stage": self.cfg.deepspeed.zero_stage, "config": to_dict(self.cfg),
                "transformer": {k: v for k, v in dict(self.engine.module.config).items() if not k.startswith("_")},
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.lora:
            meta["lora"] = dict(self.lora)
        tag, deleted = store.save(self.engine, self.root, step, client, meta, keep_last=self.cfg.train.keep_last,
                                  after_rank_files=self.after_rank_files, exclude_frozen=bool(self.lora))
        log.info("saved checkpoint %s", self.root / tag)
        if deleted:
            log.info("train.keep_last=%d: deleted %s", self.cfg.train.keep_last, ", ".join(deleted))
        self.last_saved = step
        return True

    def restore(self, tag: str | None = None) -> tuple[int, dict, int]:
        """Load `tag` (default `latest`; at any world size, t2i.checkpoint.store.load) -> (step, data state,
        skipped count)."""
        broken = store.incomplete_tags(self.root)
        if tag:  # an explicit tag (may be older than `latest`): it becomes `latest`
            newer = store.resume_from(self.root, tag)
            if newer:
                log.warning("resuming from %s: `latest` now names it; the newer tag(s) %s will be replaced "
                            "as the run reaches their steps again", tag, ", ".join(newer))
        tag = tag or store.latest_tag(self.root)
        if broken:
            log.warning("incomplete checkpoint folder(s) in %s (a save that did not finish; no meta.json): %s; "
                        "ignoring them and resuming from %s", self.root, ", ".join(broken),
                        f"latest = {tag}" if tag == store.latest_pointer(self.root) else tag)
        if self.cfg.optimizer.kind == "adamw_8bit" and store.read_meta(self.root, tag)["world_size"] != self.world:
            raise CheckpointError(f"{self.root / tag} was written by {store.read_meta(self.root, tag)['world_size']} "
                                  f"rank(s); optimizer.kind=adamw_8bit resumes at the same world size only "
                                  f"(DeepSpeed's universal checkpoint reshards Adam's fp32 state, not "
                                  f"bitsandbytes' 8-bit blocks)")
        written_by = store.read_meta(self.root, tag)["world_size"]
        if self.cfg.data.buckets is not None and written_by != self.world:
            if not self.force:
                raise CheckpointError(
                    f"{self.root / tag} was written by {written_by} rank(s) with data.buckets set; resuming with "
                    f"{self.world} would drop the samples waiting in every rank's bucket buffers and restart the "
                    f"data streams' epoch (docs/design/buckets.md); resume with {written_by} rank(s), or pass "
                    f"--force-override to do it anyway")
            log.warning("--force-override: resuming a bucketed run written by %d rank(s) with %d: the samples "
                        "waiting in the bucket buffers are dropped and the data streams restart their epoch",
                        written_by, self.world)
        if self.lora:
            self._check_lora(tag, written_by)
        meta, client = store.load(self.engine, self.root, tag, strict=not self.lora)
        self.ema.load_state_dict(client["ema"])
        if client.get("resharded_from"):  # per-rank RNG states of another world size: derive fresh ones
            store.reseed(self.generator, meta["config"]["run"]["seed"], meta["step"], dist.get_rank())
        else:
            store.set_rng_state(client["rng"], self.generator)
        log.info("resumed from %s at step %d%s", self.root / tag, meta["step"],
                 f" (written by {client['resharded_from']} rank(s); resharded)" if client.get("resharded_from") else "")
        self.last_saved = meta["step"]
        return meta["step"], client["data"], client["skipped_nonfinite"]

    def _check_lora(self, tag: str, written_by: int) -> None:
        """A LoRA tag holds the adapters only: it must have been trained on this very base (content hash),
        and it resumes at its own world size (DeepSpeed's universal conversion of a tag saved without its
        frozen parameters is untested)."""
        saved = store.read_meta(self.root, tag).get("lora")
        if not saved:
            raise CheckpointError(f"{self.root / tag} holds a full model, not LoRA adapters (no \"lora\" in its "
                                  f"meta.json); this run has lora.rank={self.cfg.lora.rank}")
        if saved.get("base_sha256") != self.lora["base_sha256"]:
            raise CheckpointError(f"{self.root / tag}: its LoRA adapters were trained on the base {saved.get('base')} "
                                  f"(sha256 {saved.get('base_sha256')}); this run's base {self.lora['base']} has "
                                  f"sha256 {self.lora['base_sha256']}: another base model. Resume with the run's "
                                  f"own base weights, or start a new run")
        if written_by != self.world:
            raise CheckpointError(f"{self.root / tag} is a LoRA checkpoint written by {written_by} rank(s); it "
                                  f"resumes at that world size only (a universal checkpoint of a tag saved "
                                  f"without its frozen parameters is untested): resume with {written_by} rank(s)")

    def last_good(self) -> str:
        return f"{store.latest_tag(self.root)!r} in {self.root}"
