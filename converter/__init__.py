"""quantize-model: stream, quantize and load bitsandbytes-compatible 4-bit checkpoints."""

__version__ = "0.1.0"
