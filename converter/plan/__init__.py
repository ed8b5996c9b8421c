"""The conversion plan: which tensors get quantized, options, output shards, preflight."""
