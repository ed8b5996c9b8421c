"""The conversion quantizers: a shard's tensors streamed through the kernels (CPU, CUDA, int8)."""
