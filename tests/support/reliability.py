"""A pytest plugin (listed in tests/conftest.py) that sums up what the reliability tests injected and what survived.

Tests take the ``reliability`` fixture and record each fault or bad input they tried::

    reliability.record(kind="fault", name="worker SIGKILL", survived=True, lost_samples=0, lost_checkpoints=0)

At the end of the session one block is printed (``make reliability``, ``make test``): faults
injected / survived, bad inputs tried / handled, samples and checkpoints lost (must be 0). A loss
turns the session red even if the recording test forgot to assert it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

KINDS = ("fault", "bad_input")


@dataclass
class Record:
    kind: str
    name: str
    survived: bool
    lost_samples: int = 0
    lost_checkpoints: int = 0
    detail: str = ""
    test: str = ""


@dataclass
class Ledger:
    records: list[Record] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        f = [r for r in self.records if r.kind == "fault"]
        b = [r for r in self.records if r.kind == "bad_input"]
        return {"faults_injected": len(f), "faults_survived": sum(r.survived for r in f),
                "bad_inputs_tried": len(b), "bad_inputs_handled": sum(r.survived for r in b),
                "lost_samples": sum(r.lost_samples for r in self.records),
                "lost_checkpoints": sum(r.lost_checkpoints for r in self.records)}

    def lines(self) -> list[str]:
        t = self.totals()
        out = [f"faults injected: {t['faults_injected']}, survived: {t['faults_survived']}",
               f"bad inputs tried: {t['bad_inputs_tried']}, handled (skipped+counted or clear error): "
               f"{t['bad_inputs_handled']}",
               f"samples lost: {t['lost_samples']}, checkpoints lost: {t['lost_checkpoints']} (must be 0)"]
        for r in self.records:
            mark = "ok  " if r.survived and not (r.lost_samples or r.lost_checkpoints) else "FAIL"
            extra = f" - {r.detail}" if r.detail else ""
            out.append(f"  {mark} {r.kind:<9} {r.name}{extra}")
        return out


_LEDGER = Ledger()


class Recorder:
    """What a test sees: ``record(...)`` one fault or bad input."""

    def __init__(self, ledger: Ledger, test: str):
        self._ledger, self._test = ledger, test

    def record(self, *, kind: str, name: str, survived: bool, lost_samples: int = 0, lost_checkpoints: int = 0,
               detail: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"reliability.record: kind must be one of {KINDS}, got {kind!r}")
        self._ledger.records.append(Record(kind, name, bool(survived), int(lost_samples), int(lost_checkpoints),
                                           detail, self._test))


@pytest.fixture
def reliability(request) -> Recorder:
    return Recorder(_LEDGER, request.node.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _LEDGER.records:
        return
    terminalreporter.section("reliability summary")
    for line in _LEDGER.lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    t = _LEDGER.totals()
    if (t["lost_samples"] or t["lost_checkpoints"]) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
