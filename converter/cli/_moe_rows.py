"""The MoE rows of the convert summary and the dry-run plan: what the experts became, who loads the folder."""

from __future__ import annotations

from typing import Any


def moe_rows(t: Any, summary: Any) -> None:
    """Add them to the rich table ``t``; ``summary`` is converter.plan.moe.MoeSummary or None (dense)."""
    if summary is None:
        return
    t.add_row("MoE experts", summary.layout)
    t.add_row("Loads with", "; ".join(summary.loaders) or "none known")
    if summary.not_loaders:  # Llama 4's per-expert records: every loader known here reads them
        t.add_row("Not with", "; ".join(summary.not_loaders))
