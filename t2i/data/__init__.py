"""Data: shard lists (`shards`), one sample's decoding (`decode`), the resumable loader (`loader`),
precomputed encodings (`cache`), shard writers (`writers`) and the synthetic shapes domain (`shapes`)."""
