"""Values that are valid but probably not meant: warned about at the start of a run, never refused.

`Config.validate` refuses what cannot work (a negative step count, an unknown sampler). These run, but
quietly do less than the config seems to say, which is easy to miss in a short test run that is
later made long, or a long config cut short with `train.steps=20`:

* warm-up that never ends (warmup_steps >= steps): the peak learning rate is never reached;
* cadences longer than the run (ckpt_every, sample.every, validation.every, log_every > steps):
  what they schedule happens only at the last step, or not at all;
* `sample.geneval_per_tag` without `sample.every`: the live GenEval never runs;
* classifier-free guidance in the samples of a model trained from scratch without caption dropout:
  the unconditional prediction it extrapolates from is never trained;
* a cosine floor above the peak is refused elsewhere; a schedule that ends inside warm-up is the
  first case.
"""

from __future__ import annotations

from t2i.config import Config


def odd_values(cfg: Config) -> list[str]:
    """One line per odd value, naming the keys and what happens instead."""
    t, out = cfg.train, []
    if t.warmup_steps >= t.steps:
        out.append(f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate never "
                   f"leaves warm-up (at most {t.steps / max(1, t.warmup_steps):.0%} of train.lr={t.lr:g}, at the last "
                   f"step); lower train.warmup_steps")
    if t.ckpt_every > t.steps:
        out.append(f"train.ckpt_every={t.ckpt_every} > train.steps={t.steps}: no periodic checkpoint, only the "
                   f"one at the last step (or on a stop signal)")
    if t.log_every > t.steps:
        out.append(f"train.log_every={t.log_every} > train.steps={t.steps}: one log line, at the last step "
                   f"(train.log_every=0 logs ~10 times per run)")
    s = cfg.sample
    if s.every > t.steps:
        out.append(f"sample.every={s.every} > train.steps={t.steps}: no sample grid during training, only the "
                   f"final one")
    if s.geneval_per_tag > 0 and s.every == 0:
        out.append(f"sample.geneval_per_tag={s.geneval_per_tag} without sample.every: the live GenEval never "
                   f"runs (it scores at every sample.every steps)")
    x = cfg.text
    if (s.guidance != 1.0 and x.dropout_clip_l == x.dropout_clip_g == x.dropout_t5 == 0.0
            and not cfg.model.pretrained and not t.init_from):
        out.append(f"sample.guidance={s.guidance:g} but no caption dropout (text.dropout_clip_l / _clip_g / _t5 "
                   f"are 0): a model trained from scratch never learns the unconditional prediction that "
                   f"guidance extrapolates from; set e.g. text.dropout_t5=0.1, or sample.guidance=1")
    v = cfg.validation
    if v.shards is not None and v.every > t.steps:
        out.append(f"validation.every={v.every} > train.steps={t.steps}: the validation loss is computed at the "
                   f"last step only")
    return out
