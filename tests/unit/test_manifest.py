"""Fingerprint and manifest semantics: a stage is done iff its manifest matches."""
from __future__ import annotations

from typing import ClassVar

from pipeline import manifest as mf
from pipeline import store
from pipeline.configbase import StrictModel


class Cfg(StrictModel):
    size: int = 64
    processes: int = 4
    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("processes",)


def test_fingerprint_tracks_config_inputs_and_ignores_scheduling():
    a = mf.fingerprint("download", Cfg(), {})
    assert a == mf.fingerprint("download", Cfg(), {})
    assert a != mf.fingerprint("download", Cfg(size=32), {})
    assert a == mf.fingerprint("download", Cfg(processes=16), {}), "process count must not re-run a stage"
    assert a != mf.fingerprint("embed", Cfg(), {})

    class Grown(Cfg):  # a later release adds a field whose default keeps the old behaviour
        new_knob: bool = False
    assert a == mf.fingerprint("download", Grown(), {}), "a new defaulted field must not re-run finished stages"
    assert a != mf.fingerprint("download", Grown(new_knob=True), {})
    b = mf.fingerprint("embed", Cfg(), {"download": a})
    c = mf.fingerprint("embed", Cfg(), {"download": mf.fingerprint("download", Cfg(size=32), {})})
    assert b != c, "a changed upstream stage must change downstream fingerprints"


def test_stage_states(tmp_path):
    uri = store.normalize(str(tmp_path / "run" / "download"))
    fp = mf.fingerprint("download", Cfg(), {})
    assert mf.stage_state(uri, fp).state == "pending"
    mf.mark_started(uri, fp)
    store.write_bytes_atomic(store.join(uri, "shards", "00000.tar"), b"x" * 10)
    assert mf.stage_state(uri, fp).state == "partial", "outputs without a manifest never look done"
    assert mf.stage_state(uri, "other").state == "pending", "another fingerprint's leftovers are not this attempt"
    m = mf.write_manifest(uri, stage="download", fp=fp, started_at=0.0, counts={"ok": 1}, metrics={},
                          outputs={}, node={"hostname": "h"}, config={})
    assert m["files"] == [{"path": "shards/00000.tar", "bytes": 10}] and m["total_bytes"] == 10
    st = mf.stage_state(uri, fp)
    assert st.state == "done" and st.manifest["counts"] == {"ok": 1}
    assert mf.stage_state(uri, "changed").state == "pending"


def test_corrupt_manifest_is_not_done(tmp_path):
    uri = store.normalize(str(tmp_path / "s"))
    store.write_bytes_atomic(store.join(uri, mf.MANIFEST), b"{not json")
    assert mf.stage_state(uri, "fp").state == "pending"


class TrainLike(StrictModel):
    lr: float = 1e-4
    steps: int = 100
    log_every: int = 10
    extent_fields: ClassVar[tuple[str, ...]] = ("steps",)
    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("log_every",)


def test_steps_and_cadence_leave_the_fingerprint_lr_does_not(monkeypatch):
    a = mf.fingerprint("train_base", TrainLike(), {})
    assert a == mf.fingerprint("train_base", TrainLike(steps=2000, log_every=1), {}), "longer training continues"
    assert a != mf.fingerprint("train_base", TrainLike(lr=3e-4), {}), "another lr is another model"
    assert mf.extent(TrainLike(steps=1200)) == {"steps": 1200}
    monkeypatch.setattr(mf, "code_version", lambda: "99.0.0")
    assert a == mf.fingerprint("train_base", TrainLike(), {}), "a package upgrade never invalidates"


def test_short_attempt_is_extended_not_done(tmp_path):
    uri = store.normalize(str(tmp_path / "run" / "train_base" / "abc"))
    fp = mf.fingerprint("train_base", TrainLike(), {})
    mf.write_manifest(uri, stage="train_base", fp=fp, started_at=0.0, counts={}, metrics={}, outputs={},
                      node={}, config={}, extent={"steps": 1000})
    assert mf.stage_state(uri, fp, {"steps": 1000}).state == "done"
    assert mf.stage_state(uri, fp, {"steps": 800}).state == "done", "trained further than asked: nothing to do"
    st = mf.stage_state(uri, fp, {"steps": 1200})
    assert st.state == "short" and st.manifest["extent"] == {"steps": 1000}
