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
    b = mf.fingerprint("embed", Cfg(), {"download": {"fingerprint": a}})
    c = mf.fingerprint("embed", Cfg(), {"download": {"fingerprint": mf.fingerprint("download", Cfg(size=32), {})}})
    assert b != c, "a changed upstream stage must change downstream fingerprints"


def test_stage_states(tmp_path):
    uri = store.normalize(str(tmp_path / "run" / "download"))
    fp = mf.fingerprint("download", Cfg(), {})
    assert mf.stage_state(uri, fp).state == "pending"
    mf.mark_started(uri, fp)
    store.write_bytes_atomic(store.join(uri, "shards", "00000.tar"), b"x" * 10)
    assert mf.stage_state(uri, fp).state == "partial", "outputs without a manifest never look done"
    assert mf.stage_state(uri, "other").state == "stale"
    m = mf.write_manifest(uri, stage="download", fp=fp, started_at=0.0, counts={"ok": 1}, metrics={},
                          outputs={}, node={"hostname": "h"}, config={})
    assert m["files"] == [{"path": "shards/00000.tar", "bytes": 10}] and m["total_bytes"] == 10
    st = mf.stage_state(uri, fp)
    assert st.state == "done" and st.manifest["counts"] == {"ok": 1}
    assert mf.stage_state(uri, "changed").state == "stale"


def test_corrupt_manifest_is_not_done(tmp_path):
    uri = store.normalize(str(tmp_path / "s"))
    store.write_bytes_atomic(store.join(uri, mf.MANIFEST), b"{not json")
    assert mf.stage_state(uri, "fp").state == "pending"
