"""Commands that register on the main app: benchmarks and cluster submission.

Kept apart from cli.py so each file stays one concern.
"""
from __future__ import annotations
