"""``quantize-model inspect PATH --memory``: what each device will hold for a device_map / max_memory.

The same plan ``load_quantized(PATH, device_map=..., max_memory=...)`` makes (accelerate's, on the
model skeleton sized by the 4-bit records' real bytes), computed from the shard headers only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click

from converter.cli._app import App, table
from converter.units import human_bytes


def parse_device_map(text: str) -> str | dict[str, Any]:
    """``auto`` / ``balanced`` / ``sequential`` / a device, or a JSON object ``{"lm_head": "cpu", ...}``."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"--device-map: not valid JSON ({exc})"
        raise click.BadParameter(msg) from None
    if not isinstance(value, dict):
        msg = "--device-map: expected a JSON object module -> device"
        raise click.BadParameter(msg)
    return value


def parse_max_memory(items: tuple[str, ...]) -> dict[str, str] | None:
    """``("0=30GiB", "cpu=64GiB")`` -> ``{"0": "30GiB", "cpu": "64GiB"}``."""
    out = {}
    for item in items:
        key, sep, size = item.partition("=")
        if not sep or not key or not size:
            msg = f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. 0=30GiB or cpu=64GiB"
            raise click.BadParameter(msg)
        out[key.strip()] = size.strip()
    return out or None


def show_memory(
    app: App,
    path: Path,
    device_map: str,
    max_memory: tuple[str, ...],
    dtype: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Print the plan and the bytes per device (a table, or JSON with --json); a Hub repo id is
    fetched at ``revision``; ``trust_remote_code``: the repository code its config names may run."""
    from converter.loader.devices import AbsentDeviceWarning, absent_device_note
    from converter.loader.estimate import estimate

    planned_map, budget = parse_device_map(device_map), parse_max_memory(max_memory)
    note = absent_device_note(planned_map, budget)  # a GPU this machine lacks: planned, and said so
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AbsentDeviceWarning)  # said below, once, as a CLI warning
            plan, per_device = estimate(
                path, planned_map, budget, dtype, revision=revision, trust_remote_code=trust_remote_code
            )
    except ValueError as exc:  # transformers' refusal, which names its Python argument only
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        app.abort(
            f"{path}: its config.json names repository code (auto_map), which the estimate runs to build "
            "the model; pass --trust-remote-code if you trust that code",
            2,
        )
    notes = [note] if note else []
    for text in notes:
        app.warn(text)
    if app.json:
        app.print_json(
            {
                "device_map": plan,
                "bytes_per_device": per_device,
                "total": sum(per_device.values()),
                "warnings": notes,
            }
        )
        return
    t = table()
    for device, size in per_device.items():
        t.add_row(f"Device {device}", human_bytes(size))
    t.add_row("Total", human_bytes(sum(per_device.values())))
    for name, device in plan.items():
        t.add_row(f"  {name or '(whole model)'}", str(device))
    app.print_table(t)
