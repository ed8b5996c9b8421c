"""--max-shard-size (converter.plan.tensor_plan.parse_size) against the parsers of the libraries it
mirrors: huggingface_hub's parse_size_to_int, which transformers' save_pretrained uses for its own
max_shard_size (decimal units), and accelerate's convert_file_size_to_int (binary units, which
huggingface_hub does not take)."""

from __future__ import annotations

import pytest
from accelerate.utils.modeling import convert_file_size_to_int
from huggingface_hub.serialization._base import parse_size_to_int

from converter.errors import InputError
from converter.plan.tensor_plan import parse_size

# whole and decimal values; 4.1MB, 8.2MB, 2.01KB, 0.57GB: float(x) * 10**k falls just below the whole
# number, and the libraries truncate it (4.1MB = 4_099_999 bytes): so does parse_size, to the byte
DECIMAL = ["5GB", "1.5GB", "2.5MB", "4.1MB", "8.2MB", "2.01KB", "32.3KB", "0.57GB", "1.1GB", "0.3MB", "4.7GB",
           "0.29GB", "1.15GB", "3.3TB", "1.5gb", "2.5mb", "1.5Gb", "500MB", "60KB", "1.5 GB",
           " 2.5MB "]  # fmt: skip


@pytest.mark.parametrize("text", DECIMAL)
def test_decimal_sizes_equal_huggingface_hub(text: str) -> None:
    assert parse_size(text) == parse_size_to_int(text)


def test_every_decimal_size_with_up_to_three_places_equals_huggingface_hub() -> None:
    values = {f"{i / 10**p:.{p}f}{u}" for i in range(1, 1000) for p in (1, 2, 3) for u in ("KB", "MB", "GB")}
    differ = [t for t in sorted(values) if parse_size(t) != parse_size_to_int(t)]
    assert not differ


@pytest.mark.parametrize("text", ["1GiB", "1.5GiB", "2.5MiB", "0.1MiB", "4.1KiB", "512MiB", "64KiB"])
def test_binary_sizes_equal_accelerate(text: str) -> None:
    assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize("value", [True, False, 1.5e9, None])
def test_a_size_that_is_neither_a_string_nor_an_int_is_an_input_error(value: object) -> None:
    """max_shard_size=True (a TOML `max_shard_size = true`) was taken as 1 byte (a bool is an int): every
    tensor in its own shard; a float raised TypeError("expected string or bytes-like object")."""
    with pytest.raises(InputError, match="invalid size"):
        parse_size(value)
