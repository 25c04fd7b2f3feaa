"""Data: tokenizers, preparation into megatron-core indexed datasets, the deterministic sampler."""
