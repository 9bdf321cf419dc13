"""Fixtures of the stage tests only."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_encoders) -> str:
    """A run as the sample and evaluate stages read it, built once: ``embed/encoders.json`` naming
    the session's tiny encoders, and every model's ``train_<role>/final/step_00000003/`` holding
    random debug-flavor weights (written by the training loop's own ``write_final``), the five
    default-cascade models with a metrics.jsonl (tests/support/runs.py). Read it; to change it,
    copy it first."""
    from tests.support.runs import write_trained_run

    return write_trained_run(tmp_path_factory.mktemp("trained_run"), tiny_encoders)
