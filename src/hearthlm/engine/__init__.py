"""Generation machinery: KV cache, sampler, generation loop."""
