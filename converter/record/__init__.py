"""A quantized weight's bitsandbytes state-dict entries and its error statistics."""
