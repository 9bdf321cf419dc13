"""The whole suite's settings, and its shared fixtures registered as plugins (tests/support/).

Offline by construction: no hub downloads, no usage stats, W&B off. Fixtures come from the plugin
modules below and are never imported by name; a folder's own conftest.py holds the fixtures only
that folder uses. Plain helpers are imported package-qualified (``from tests.support.data import
write_tar``).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = [
    "tests.support.env",          # moto_server, s3_bucket, local_ray, single_thread_torch
    "tests.support.runs",         # tiny_encoders, smoke_run
    "tests.support.reliability",  # the reliability fixture and the end-of-session summary
]
