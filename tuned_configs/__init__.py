"""Tuned block-size tables (JSON data) per chip generation: tuned_configs/<generation>/<kernel>.json,
and the bundle counts libtpu gave for compiled configs: tuned_configs/<generation>/llo/<kernel>.json.

See autotune/tables.py and autotune/llo.py for the schemas. This package holds data and the file
locators only.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def table_path(generation: str, kernel: str) -> Path:
    """Path of the table of `kernel` for `generation` (it may not exist)."""
    return ROOT / generation / f"{kernel}.json"


def bundles_path(generation: str, kernel: str) -> Path:
    """Path of the bundle counts of `kernel`'s compiled configs for `generation` (it may not exist)."""
    return ROOT / generation / "llo" / f"{kernel}.json"
