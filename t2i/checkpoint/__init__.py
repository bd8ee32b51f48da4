"""Checkpoints on disk: the sharded format and its pointer (`store`), the sharded EMA (`ema`),
rebuilding a model from a checkpoint or a diffusers folder (`loading`), and consolidation / export
to safetensors and diffusers (`export`). The layout is in docs/design/checkpoints.md."""
