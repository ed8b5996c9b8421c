"""quantize-model: stream, quantize and load bitsandbytes-compatible 4-bit checkpoints."""

__version__ = "0.1.0"

__all__ = [
    "ConversionResult",
    "__version__",
    "convert",
    "graphed_greedy",
    "load_quantized",
    "load_quantized_state",
    "replace_linear_layers",
]


def __getattr__(name: str):  # lazy: `import converter` stays light (no torch) until convert is used
    if name == "convert":
        from converter.writer.pipeline import convert

        return convert
    if name == "ConversionResult":
        from converter.writer.report import ConversionResult

        return ConversionResult
    if name == "graphed_greedy":
        from converter.loader.decode import graphed_greedy

        return graphed_greedy
    if name in ("load_quantized", "load_quantized_state", "replace_linear_layers"):
        from converter import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")  # noqa: EM102
