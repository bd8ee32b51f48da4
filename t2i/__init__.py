"""t2i: a DeepSpeed-scaled text-to-image training library (SD3-style MMDiT, flow matching and MixFlow).

Layers, imported in one direction only (tests/test_layout.py checks it):

    core       config, errors, flow (the σ convention), io, runtime, viz, geneval_spec
    models/    the MMDiT, text encoders, VAE
    data/      shards, decoding, the loader, caches, shard writers, the shapes domain
    checkpoint/  the on-disk format, EMA, loading and export
    eval/      sampling, GenEval, FID / KID, CLIP score, Slow Flow
    train/     the engine, the step, checkpoint policy, run folder, preemption, logging

The flows a user runs live in pipelines/ and the standalone utilities in tools/; only t2i.cli,
the command's dispatcher, imports them.
"""
