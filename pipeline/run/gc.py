"""``t2i gc``: the only code that deletes what a run produced, and only what the user confirmed.

What it offers to remove:

* superseded attempts: attempt folders of a stage that the run's current spec does not use
  (an older config, a ``t2i rerun``'s predecessor), and attempts of stages no longer in the spec;
* incomplete checkpoints: ``step_N`` folders without ``COMPLETE`` that are older than the
  attempt's newest complete checkpoint (a crashed save; never one that may be being written);
* damaged checkpoints: complete ones whose files are missing or differ in size from what
  ``COMPLETE`` lists (one listing per checkpoint, no download), or that a restore found
  damaged by checksum and marked (``DAMAGED.json``); training already skips them.

Deletion is manifest-first: an attempt stops looking done before any of its files go, so an
interrupted gc never leaves a half-deleted attempt that looks complete.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.run.graph import available_stages
from pipeline.run.planning import describe_attempt, load_run_spec, plan_stages

@dataclass
class Garbage:
    kind: str          # superseded | unused-stage | incomplete-checkpoint | damaged-checkpoint
    stage: str
    uri: str
    bytes: int
    age_s: float | None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def find_garbage(run: str) -> list[Garbage]:
    """Everything ``t2i gc RUN --yes`` would delete, with sizes. Reads only."""
    spec = load_run_spec(run)
    plans = plan_stages(spec)
    items: list[Garbage] = []
    for stage in (s.name for s in available_stages()):
        attempts = layout.list_attempts(run, stage)
        if not attempts:
            continue
        current = plans[stage].attempt_uri if stage in plans else None
        pointed = layout.read_current(run, stage)
        for name, uri in attempts:
            if uri == current:
                items.extend(checkpoint_garbage(stage, uri))
                continue
            d = describe_attempt(uri)
            note = f"{d['state']}" + (f", {d['steps']} steps" if d["steps"] is not None else "")
            if uri == pointed:
                note += "; the newest finished attempt (t2i sample uses it until the current one finishes)"
            items.append(Garbage("superseded" if stage in plans else "unused-stage", stage, uri, d["bytes"],
                                 d["age_s"], note))
    return items


def checkpoint_garbage(stage: str, attempt: str) -> list[Garbage]:
    root = store.join(attempt, layout.CHECKPOINTS)
    steps = []
    for uri in store.listdir(root):
        step = layout.step_of(uri)
        if step is not None:
            steps.append((step, uri.rstrip("/"), store.exists(store.join(uri, layout.CHECKPOINT_COMPLETE))))
    complete = [s for s, _, ok in steps if ok]
    newest = max(complete) if complete else -1
    out = []
    for step, uri, ok in sorted(steps):
        fs, path = store.fs_and_path(uri)
        if not ok and step < newest:
            out.append(Garbage("incomplete-checkpoint", stage, uri, int(fs.du(path, total=True)), None,
                               f"step {step}, older than complete step {newest}"))
        elif ok:
            why = checkpoint_damage(uri)
            if why:
                out.append(Garbage("damaged-checkpoint", stage, uri, int(fs.du(path, total=True)), None,
                                   f"step {step}: {why}"))
    return out


def checkpoint_damage(uri: str) -> str | None:
    """Why a complete checkpoint cannot be restored, from one listing (sizes against COMPLETE's
    file list) and the mark a restore leaves when a checksum differs; None if it looks whole."""
    marker = store.join(uri, layout.CHECKPOINT_DAMAGED)
    if store.exists(marker):
        return "a restore found it damaged: " + str(store.read_json(marker).get("reason", ""))
    listing = store.read_json(store.join(uri, layout.CHECKPOINT_COMPLETE)).get("files")
    if not listing:
        return None  # an older release's checkpoint: nothing to compare with
    fs, root = store.fs_and_path(uri)
    root = root.rstrip("/")
    sizes = {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in fs.find(root, detail=True).items()}
    for rel, want in sorted(listing.items()):
        if rel not in sizes:
            return f"{rel} is missing"
        if sizes[rel] != int(want["bytes"]):
            return f"{rel} has {sizes[rel]} bytes, COMPLETE says {want['bytes']}"
    return None


def collect(items: list[Garbage], log: Callable[[str], None] = print) -> int:
    """Delete ``items`` (manifest first for attempts). Returns the bytes freed."""
    freed = 0
    for g in items:
        if g.kind not in ("incomplete-checkpoint", "damaged-checkpoint"):  # attempts: manifest first
            store.remove(mf.manifest_uri(g.uri), recursive=False)  # never looks done again
            run = g.uri.rstrip("/").rsplit("/", 2)[0]
            if layout.read_current(run, g.stage) == g.uri:
                store.remove(store.join(layout.stage_root(run, g.stage), layout.CURRENT), recursive=False)
        store.remove(g.uri)
        freed += g.bytes
        log(f"removed {g.uri} ({human_bytes(g.bytes)})")
    return freed


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, sec in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= sec:
            return f"{s / sec:.1f}{unit}"
    return f"{s:.0f}s"
