"""quantize-model: stream, quantize and load bitsandbytes-compatible 4-bit checkpoints."""

__version__ = "0.1.0"

__all__ = ["ConversionResult", "__version__", "convert"]


def __getattr__(name: str):  # lazy: `import converter` stays light (no torch) until convert is used
    if name == "convert":
        from converter.pipeline import convert

        return convert
    if name == "ConversionResult":
        from converter.report import ConversionResult

        return ConversionResult
    raise AttributeError(f"module 'converter' has no attribute {name!r}")  # noqa: EM102
