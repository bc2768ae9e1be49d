"""Tuned block-size tables (JSON data) per chip generation: tuned_configs/<generation>/<kernel>.json.

See autotune/tables.py for the schema. This package holds data and the file locator only.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def table_path(generation: str, kernel: str) -> Path:
    """Path of the table of `kernel` for `generation` (it may not exist)."""
    return ROOT / generation / f"{kernel}.json"
