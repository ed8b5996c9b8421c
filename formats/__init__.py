"""The on-disk format of quantize-model: codebooks, quant types, the quantized-tensor record,
shard reader/writer, index and transformers/bitsandbytes compatibility. No CLI, no network."""
