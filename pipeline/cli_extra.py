"""Commands that register themselves on the main app: cluster submission and benchmarks.

Kept apart from cli.py so each file stays one concern.
"""
from __future__ import annotations

from pipeline import cli_submit  # noqa: F401  t2i submit / logs / stop
from pipeline import cli_bench  # noqa: F401  t2i bench train / loader / embed
