"""The networks: the MMDiT (diffusers' SD3Transformer2DModel), the frozen text encoders (CLIP-L,
OpenCLIP-bigG, T5), the VAE, their construction from a config, and the FLOP formula."""
