"""Exceptions the converter raises, each with the exit code the CLI gives it.

Messages are one line: they name the file or tensor and end with what to do. Exit codes follow
pip-tools: 2 for usage or input errors (the user must change something), 1 for a conversion that
failed while running, 75 (EX_TEMPFAIL of sysexits.h) for a refusal that goes away by itself (another
process is writing the output folder): the same command, retried later, works.
"""

from __future__ import annotations


class ConverterError(Exception):
    """Base of every error the converter raises on purpose."""

    exit_code = 1


class InputError(ConverterError):
    """The source or the options cannot be converted as given."""

    exit_code = 2


class SourceNotFoundError(InputError):
    """The source path does not exist, or a file it names is missing."""


class CorruptFileError(InputError):
    """A weight file or index is unreadable, truncated or inconsistent."""


class AlreadyQuantizedError(InputError):
    """The source is already quantized (quantization_config, F8 tensors, packed 4-bit weights)."""


class PickleOnlyError(InputError):
    """The source has only pickle (.bin/.pt) weights and pickle was not allowed."""


class UnsupportedTensorError(InputError):
    """A tensor selected for quantization has a dtype, shape or size we refuse."""


class NonFiniteTensorError(InputError):
    """A tensor selected for quantization holds NaN or Inf."""


class OutputExistsError(InputError):
    """The output folder holds something we did not write, or a different plan."""


class FolderBusyError(OutputExistsError):
    """Another quantize-model process holds the output folder's lock: nothing is wrong with the command,
    which works once that process ends. Exit code 75 (EX_TEMPFAIL), which scripts can retry on."""

    exit_code = 75


class ConversionFailedError(ConverterError):
    """The conversion started but could not finish (disk full, I/O error...)."""


class NonFiniteInputError(ValueError):
    """The tensor handed to a quantize kernel holds NaN or Inf: its blocks cannot be scaled to [-1, 1].

    A ValueError (a bad argument of the kernel API), raised by every kernel path (numpy, torch, CUDA);
    the pipeline turns it into NonFiniteTensorError naming the file and tensor.
    """

    @classmethod
    def in_blocks(cls, bad_blocks: int, blocks: int, blocksize: int) -> NonFiniteInputError:
        """The CPU quantize kernels' error: they count the blocks that held NaN or Inf."""
        return cls(f"input contains NaN or Inf (in {bad_blocks} of {blocks} blocks of {blocksize})")

    @classmethod
    def in_tensor(cls, n: int, blocksize: int) -> NonFiniteInputError:
        """The CUDA quantize kernels' error: one flag for the whole tensor."""
        return cls(f"input contains NaN or Inf (a tensor of {n} elements, blocks of {blocksize})")

    @classmethod
    def in_absmax(cls) -> NonFiniteInputError:
        """Nested quantization of an absmax that holds NaN or Inf."""
        return cls("absmax contains NaN or Inf: it must come from quantize_4bit of a finite tensor")
