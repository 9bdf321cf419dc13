"""``<run>/_JOB.json``: the record of the Ray jobs a run was submitted as (pipeline/run/submit.py).

The top level is the latest job (what ``t2i logs``, ``stop`` and ``status`` find); every earlier
job of the run is kept, oldest first, under ``history``: a submission never drops what an earlier
one recorded. No credentials are ever written here (the dashboard address has its userinfo
stripped; forwarded environment variables are named, not copied)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline import layout, store

JOB_FILE = layout.JOB
# What the run's _JOB.json keeps of earlier submissions (oldest first), beside the latest job.
HISTORY_KEY = "history"


@dataclass
class JobRecord:
    """What ``<run>/_JOB.json`` holds: enough to find the job again, no credentials."""

    submission_id: str
    address: str                    # the dashboard (Jobs API) address, userinfo stripped
    run_uri: str
    run_id: str
    entrypoint: str
    spec_path: str                  # where the job reads its spec: shipped (run) or <run>/spec.yaml (resume/rerun)
    pip: bool
    submitted_at: float
    forwarded_env: list[str] = field(default_factory=list)  # names only
    verb: str = "run"               # the t2i command the job runs: run | resume | rerun
    args: list[str] = field(default_factory=list)  # its arguments, as in the entrypoint (before --address auto)
    overrides: dict = field(default_factory=dict)  # the --set applied here before submitting


def read_job_record(run: str) -> dict | None:
    uri = store.join(run, JOB_FILE)
    try:
        return store.read_json(uri) if store.exists(uri) else None
    except Exception:  # noqa: BLE001 - an unreadable record is the same as none for lookups
        return None


def read_job_history(run: str) -> list[dict]:
    """Every job recorded for ``run``, oldest first (the latest is ``_JOB.json``'s top level)."""
    record = read_job_record(run)
    if not record:
        return []
    latest = {k: v for k, v in record.items() if k != HISTORY_KEY}
    return list(record.get(HISTORY_KEY) or []) + [latest]


def write_job_record(run: str, record: JobRecord) -> None:
    """``record`` becomes ``_JOB.json``'s top level; the job it replaces moves to ``history``
    (appended: nothing an earlier submission recorded is dropped)."""
    uri = store.join(run, JOB_FILE)
    doc = dict(asdict(record))
    doc[HISTORY_KEY] = read_job_history(run)
    store.write_json(uri, doc)
