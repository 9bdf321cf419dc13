"""Checkpoints in the artifact store that are never picked up half-written.

Layout of one checkpoint (``<out>/checkpoints/step_NNNNNNNN/``; each name spelled in pipeline/layout.py)::

    ds/...                       DeepSpeed's own files (model, optimizer, LR scheduler), from save_checkpoint
    state_rank{r}.json           our per-rank state: step, data position, python RNG, world size, ZeRO stage
    rng_rank{r}.safetensors      torch CPU (+CUDA) RNG states
    ema.safetensors              the EMA (ZeRO 0-2: identical on every rank, written by rank 0)
    ema_rank{r}.safetensors      ... or each rank's EMA partition (ZeRO-3)
    COMPLETE                     written by rank 0 last, after every rank has uploaded everything:
                                 step, world size and every file of the checkpoint with its size
                                 and SHA-256

Saving: DeepSpeed writes into a local temp dir per rank (the only part the step loop waits for),
then each rank uploads what it wrote and writes ``uploaded_rank{r}.json`` (its files' sizes and
checksums); rank 0 writes ``COMPLETE`` once every rank's marker is there. With
``checkpoint_upload: background`` the uploads run in a thread while training goes
on: at most one upload in flight per rank (the next save first waits for it), and a failed upload
fails the stage at the next save or at the end, naming the file, never leaving ``COMPLETE``
behind. A checkpoint without ``COMPLETE`` (a crash, a preempted node, a half-finished upload) is
invisible to :meth:`CheckpointManager.latest`.

Restoring (:meth:`CheckpointManager.restore_point`): every rank fetches what it reads and
checks each file against ``COMPLETE``; a checkpoint any rank finds damaged (a truncated copy, a
store fault) is skipped with one warning naming it and the file, marked ``DAMAGED.json`` (later
restores skip it without fetching it; ``t2i gc`` lists it) and the next older complete one is
tried, so a damaged file never reaches ``torch.load``. Checkpoints of releases that wrote no file
list are restored unverified. A checkpoint written by another number of ranks is fetched whole
by every rank and converted to a DeepSpeed Universal Checkpoint (stages/training/elastic.py).

Unpickling: everything of ours is JSON or safetensors. DeepSpeed's own files are torch pickles
that ``engine.load_checkpoint`` reads with ``torch.load(weights_only=False)``; that is the one
place pickles from the store are loaded, and it cannot be avoided without re-implementing
DeepSpeed's checkpoint format. Only load checkpoints from a store you trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline import layout, store
from stages.training import elastic

log = logging.getLogger(__name__)
DS_TAG = layout.CHECKPOINT_DEEPSPEED  # the tag DeepSpeed saves under: its files land in <checkpoint>/ds/
step_dir_name = layout.step_name      # kept: benchmarks import it from here


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able python RNG state, torch RNG state tensors)."""
    v, internal, gauss = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return {"python": [v, list(internal), gauss]}, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = py["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is missing, or differs from what ``COMPLETE`` says was written."""


@dataclass
class RestorePoint:
    """The checkpoint every rank fetched and verified, ready for :meth:`CheckpointManager.load`."""

    step: int
    uri: str
    local: str                     # this rank's verified copy of what it reads (removed by load)
    state: dict[str, Any]          # this rank's JSON state (data position, RNG, step)
    damaged: list[str] = field(default_factory=list)  # newer checkpoints skipped, one line each
    bytes_read: list[int] = field(default_factory=list)  # what each rank fetched from the store, by rank
    written_by: int = 0            # the world size that wrote it
    peer_states: list[dict[str, Any]] = field(default_factory=list)  # every old rank's state (a resize only)
    load_dir: str = ""             # what engine.load_checkpoint reads: local, or its universal conversion

    @property
    def resized(self) -> bool:
        """Written by another number of ranks than this run has (see stages/training/elastic.py)."""
        return bool(self.peer_states)

    @property
    def universal(self) -> bool:
        """DeepSpeed must be built with ``checkpoint.load_universal`` to load it."""
        return self.load_dir != self.local


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|_rank(\d+)\.")


def rank_reads(rel: str, rank: int) -> bool:
    """Whether ``rank`` reads checkpoint file ``rel`` on restore: every rank's own files and the
    shared ones, never another rank's partition. DeepSpeed (without ``elastic_checkpoint``)
    loads only its own rank's ZeRO optimizer file (and, under ZeRO-3, its own model-state
    partition); ``mp_rank_00_model_states.pt`` and ``ema.safetensors`` are read by all."""
    m = _RANK_FILE.search(rel.rsplit("/", 1)[-1])
    return m is None or int(m.group(1) or m.group(2)) == rank


def file_digest(path: str) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a local file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


class CheckpointManager:
    """Decides when to save, saves, finds the latest complete checkpoint, loads it, prunes old ones."""

    def __init__(self, out_uri: str, *, keep_last: int, every_steps: int, every_minutes: float,
                 rank: int, world_size: int, device: torch.device, protect_through: int = -1,
                 background_budget_bytes: int = 0):
        self.root = store.join(out_uri, layout.CHECKPOINTS)
        # Checkpoints up to this step belong to an earlier *finished* run of the stage (it is
        # being extended): keep_last never prunes them; only ``t2i gc`` may, when asked.
        self.protect_through = protect_through
        self.keep_last, self.every_steps, self.every_minutes = keep_last, every_steps, every_minutes
        self.rank, self.world_size, self.device = rank, world_size, device
        self._last_save_time = time.monotonic()
        self._upload: _Upload | None = None  # the background upload in flight, if any
        # Background saves: the most local disk a snapshot may hold while training goes on (0: no
        # limit); a bigger one is uploaded synchronously, counted here and logged.
        self.background_budget_bytes = background_budget_bytes
        self.sync_fallbacks = 0
        self.snapshot_bytes = 0  # this rank's last snapshot on local disk

    # -- discovery -------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        # One glob for every COMPLETE marker, not an existence check per checkpoint folder (an
        # extended run keeps every earlier finished checkpoint: they add up).
        steps = []
        for uri in store.glob(store.join(self.root, "step_*", layout.CHECKPOINT_COMPLETE)):
            step = layout.step_of(uri.rsplit("/", 1)[0])
            if step is not None:
                steps.append(step)
        return sorted(steps)

    def latest(self) -> tuple[int, str] | None:
        """(step, uri) of the newest checkpoint with a COMPLETE marker, or None."""
        steps = self.complete_steps()
        if not steps:
            return None
        return steps[-1], store.join(self.root, step_dir_name(steps[-1]))

    # -- cadence ---------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Same answer on every rank: the time rule is decided by rank 0 and broadcast."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        if self.every_minutes <= 0:
            return by_steps
        flag = torch.tensor([1 if (time.monotonic() - self._last_save_time) >= 60 * self.every_minutes else 0],
                            device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast(flag, src=0)
        return by_steps or bool(flag.item())

    # -- save ------------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict[str, Any], ema_tensors: dict[str, torch.Tensor] | None,
             ema_sharded: bool, *, background: bool = False) -> str:
        """Collective. ``state`` is this rank's JSON-able state; EMA as described in the module doc.
        ``background``: return once the snapshot is on local disk; the upload runs in a thread."""
        self.wait()  # at most one upload in flight; its failure fails the stage here
        uri = store.join(self.root, step_dir_name(step))
        if store.exists(store.join(uri, layout.CHECKPOINT_COMPLETE)):
            return uri  # a complete checkpoint of this very step exists already: never overwrite it
        if self.rank == 0 and store.exists(uri):
            store.remove(uri)  # leftovers of a crashed save at this same step (no COMPLETE marker)
        _barrier()
        local = tempfile.mkdtemp(prefix=f"ckpt-r{self.rank}-")
        try:
            engine.save_checkpoint(local, tag=DS_TAG, save_latest=False)
            py_rng, rng_tensors = rng_state()
            state = {**state, **py_rng, "step": step, "world_size": self.world_size, "rank": self.rank}
            with open(os.path.join(local, layout.checkpoint_state(self.rank)), "w") as f:
                json.dump(state, f)
            with open(os.path.join(local, layout.checkpoint_rng(self.rank)), "wb") as f:
                f.write(st_save(rng_tensors))
            if ema_tensors is not None and (ema_sharded or self.rank == 0):
                with open(os.path.join(local, layout.checkpoint_ema(self.rank, ema_sharded)), "wb") as f:
                    f.write(st_save(ema_tensors))
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        _barrier()  # every rank's snapshot is taken: the engine may move on
        self.snapshot_bytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(local) for n in names)
        # Decided on the biggest rank's snapshot, so that every rank takes the same (collective) path.
        if background and self.background_budget_bytes and max(_gather(self.snapshot_bytes)) > self.background_budget_bytes:
            background = False
            self.sync_fallbacks += 1
            log.warning("checkpoint step %d: rank %d's snapshot (%.2f GB) exceeds checkpoint_background_budget_gb "
                        "(%.2f GB): uploaded synchronously", step, self.rank, self.snapshot_bytes / 1e9,
                        self.background_budget_bytes / 1e9)
        self._upload = _Upload(self, step, uri, local)
        self._last_save_time = time.monotonic()
        if background:
            self._upload.start()
        else:
            self._upload.run()
            self.wait()
            _barrier()  # synchronous: COMPLETE is written when save returns
        return uri

    def wait(self) -> None:
        """Wait for this rank's upload in flight (no collective); re-raise its failure."""
        up, self._upload = self._upload, None
        if up is None:
            return
        if up.is_alive() or up.ident is not None:  # a synchronous save ran it in this thread
            up.join()
        if up.error is not None:
            raise up.error

    def _prune(self) -> None:
        # A damaged checkpoint takes no place among the keep_last, and is never removed here: the
        # user may repair it from a backup, or remove it with `t2i gc`, which lists it.
        damaged = {s for s in self.complete_steps()
                   if store.exists(store.join(self.root, step_dir_name(s), layout.CHECKPOINT_DAMAGED))}
        complete = [s for s in self.complete_steps() if s not in damaged]
        keep = set(complete[-self.keep_last:])
        newest = complete[-1] if complete else -1
        for uri in store.listdir(self.root):
            s = layout.step_of(uri)
            if s is None or s in damaged:
                continue
            # Old complete ones beyond keep_last, and incomplete ones older than the newest complete
            # one; never those of an earlier finished run (see protect_through).
            if s not in keep and s <= newest and s > self.protect_through:
                store.remove(uri)

    # -- load ------------------------------------------------------------------------------
    def restore_point(self, ema_sharded: bool) -> RestorePoint | None:
        """Collective. The newest complete checkpoint that every rank fetched and verified, or
        None when there is none (a fresh start). Damaged ones are skipped, newest first; if every
        complete checkpoint is damaged the stage fails saying so (training from scratch over a
        user's checkpoints is never done silently)."""
        steps = _broadcast_object(self.complete_steps() if self.rank == 0 else None)  # rank 0's listing
        damaged: list[str] = []
        for step in reversed(steps):
            uri = store.join(self.root, step_dir_name(step))
            known = _broadcast_object(_damage_note(uri) if self.rank == 0 else None)
            if known:  # found damaged by an earlier restore: not fetched again
                damaged.append(f"checkpoint {uri} is damaged and was skipped: {known}")
                continue
            local = tempfile.mkdtemp(prefix=f"ckpt-load-r{self.rank}-")
            try:
                point = self._fetch(step, uri, local, ema_sharded)
                why = ""
            except CheckpointDamaged as e:
                point, why = None, str(e)
            reasons = [r for r in _gather(why) if r]
            if reasons and self.rank == 0:  # remembered for later restores and listed by `t2i gc`
                store.write_json(store.join(uri, layout.CHECKPOINT_DAMAGED), {"reason": reasons[0], "time": time.time()})
            if not reasons:
                point.damaged = damaged
                point.bytes_read = _gather(sum(os.path.getsize(os.path.join(d, n))
                                               for d, _, names in os.walk(local) for n in names))
                if point.resized and elastic.needs_conversion(local):
                    point.load_dir = elastic.to_universal(local)
                return point
            shutil.rmtree(local, ignore_errors=True)
            damaged.append(f"checkpoint {uri} is damaged and was skipped: {reasons[0]}")
        if damaged:
            raise RuntimeError(f"every complete checkpoint under {self.root} is damaged ({damaged[-1]}); restore "
                               "the files from a backup, or start the stage afresh with `t2i rerun`")
        return None

    def _fetch(self, step: int, uri: str, local: str, ema_sharded: bool) -> RestorePoint:
        """Download what this rank reads into ``local``, each file checked against COMPLETE: its
        own partition and the shared files (:func:`rank_reads`), or, when another number of
        ranks wrote the checkpoint, what a re-partition needs (:func:`elastic.elastic_reads`)."""
        complete = store.read_json(store.join(uri, layout.CHECKPOINT_COMPLETE))
        listing = complete.get("files")
        written_by = int(complete.get("world_size", self.world_size))
        if written_by != self.world_size:
            if listing is None:
                raise RuntimeError(f"checkpoint {uri} (written by {written_by} ranks, by a release without file "
                                   f"lists) can only be resumed on {written_by} ranks; this run has {self.world_size}")
            self._download_verified(uri, local, listing, [r for r in listing if elastic.elastic_reads(r, ema_sharded)])
            peers = []
            for r in range(written_by):
                with open(os.path.join(local, layout.checkpoint_state(r))) as f:
                    peers.append(json.load(f))
            # the step, and whatever else is the same on every rank, from rank 0's state
            state = {k: v for k, v in peers[0].items() if k not in ("data", "python", "rank")}
            return RestorePoint(step, uri, local, state, written_by=written_by, peer_states=peers, load_dir=local)
        wanted = [layout.checkpoint_state(self.rank), layout.checkpoint_rng(self.rank)]
        ema = layout.checkpoint_ema(self.rank, ema_sharded)
        if listing is None or ema in listing:
            wanted.append(ema)
        if listing is None:  # an older release's checkpoint: what is there, unverified
            try:
                _download_dir(store.join(uri, DS_TAG), os.path.join(local, DS_TAG), self.rank)
            except FileNotFoundError as e:
                raise CheckpointDamaged(f"a file is missing ({e})") from e
        else:
            wanted += [rel for rel in listing if rel.startswith(DS_TAG + "/") and rank_reads(rel, self.rank)]
        self._download_verified(uri, local, listing, wanted)
        with open(os.path.join(local, layout.checkpoint_state(self.rank))) as f:
            state = json.load(f)
        return RestorePoint(step, uri, local, state, written_by=written_by, load_dir=local)

    @staticmethod
    def _download_verified(uri: str, local: str, listing: dict | None, wanted: list[str]) -> None:
        """Fetch ``wanted`` (paths relative to the checkpoint) into ``local``; then every local file
        must be one COMPLETE lists, with its size and SHA-256 (no listing: an older release's
        checkpoint, taken unverified)."""
        try:
            for rel in wanted:
                src = store.join(uri, rel)
                if listing is None and not store.exists(src):
                    continue  # an unverified (older) checkpoint without an EMA file
                _download_file(src, os.path.join(local, rel))
        except FileNotFoundError as e:
            raise CheckpointDamaged(f"a file is missing ({e})") from e
        if listing is not None:
            for dirpath, _, names in os.walk(local):
                for name in names:
                    rel = os.path.relpath(os.path.join(dirpath, name), local)
                    expected = listing.get(rel)
                    if expected is None:
                        raise CheckpointDamaged(f"{rel} is not one of the files COMPLETE lists")
                    got = file_digest(os.path.join(dirpath, name))
                    if got != expected:
                        raise CheckpointDamaged(f"{rel} has {got['bytes']} bytes / sha256 {got['sha256'][:12]}…, "
                                                f"COMPLETE says {expected['bytes']} / {expected['sha256'][:12]}…")

    def load(self, engine, point: RestorePoint, ema_sharded: bool
             ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]] | None:
        """Restore DeepSpeed state + RNG from the verified local copy into the running engine
        (built with ``load_universal`` when ``point.universal``); return the EMA for this rank:
        its tensors, or, after a resize under ZeRO-3, every old rank's partition in rank order
        (for ``EMA.load_resharded``). Removes the local copy."""
        try:
            load_path, _ = engine.load_checkpoint(point.load_dir, tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {point.uri}")
            if point.resized:
                elastic.reseed_after_resize(point.step)
            else:
                with open(os.path.join(point.local, layout.checkpoint_rng(self.rank)), "rb") as f:
                    set_rng_state(point.state, st_load(f.read()))
            if point.resized and ema_sharded:
                return [_read_safetensors(os.path.join(point.local, layout.checkpoint_ema(r, True)))
                        for r in range(point.written_by)]
            ema = os.path.join(point.local, layout.checkpoint_ema(self.rank, ema_sharded))
            return _read_safetensors(ema) if os.path.exists(ema) else None
        finally:
            shutil.rmtree(point.local, ignore_errors=True)


def _damage_note(uri: str) -> str | None:
    """Why an earlier restore found checkpoint ``uri`` damaged, or None."""
    marker = store.join(uri, layout.CHECKPOINT_DAMAGED)
    return store.read_json(marker).get("reason", "see DAMAGED.json") if store.exists(marker) else None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        return st_load(f.read())


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _Upload(threading.Thread):
    """One rank's upload of one checkpoint snapshot; rank 0 then waits for every rank's marker
    and writes COMPLETE. Runs in the background or, for a synchronous save, in the caller."""

    def __init__(self, manager: CheckpointManager, step: int, uri: str, local: str):
        super().__init__(name=f"checkpoint-upload-{step}", daemon=True)
        self.m, self.step, self.uri, self.local = manager, step, uri, local
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            files = {os.path.relpath(os.path.join(d, n), self.local): file_digest(os.path.join(d, n))
                     for d, _, names in os.walk(self.local) for n in names}
            _upload_dir(self.local, self.uri)
            store.write_json(store.join(self.uri, layout.checkpoint_uploaded(self.m.rank)), files)
            if self.m.rank == 0:
                self._complete()
        except BaseException as e:  # noqa: BLE001 - handed to the training loop by wait()
            self.error = e
        finally:
            shutil.rmtree(self.local, ignore_errors=True)

    def _complete(self) -> None:
        """Rank 0: once every rank's files are in the store, COMPLETE with all their digests."""
        markers = [store.join(self.uri, layout.checkpoint_uploaded(r)) for r in range(self.m.world_size)]
        while not all(store.exists(u) for u in markers):
            time.sleep(0.2)  # another rank still uploads (a rank whose upload fails fails the stage)
        listing = {rel: d for u in markers for rel, d in store.read_json(u).items()}
        store.write_json(store.join(self.uri, layout.CHECKPOINT_COMPLETE), {
            "step": self.step, "world_size": self.m.world_size, "time": time.time(), "files": listing})
        self.m._prune()


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a barrier too)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _download_file(uri: str, dst: str) -> None:
    fs, path = store.fs_and_path(uri)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    store.with_retries(lambda: fs.get_file(path, dst), what=f"download {uri}")


def _upload_dir(local: str, uri: str) -> None:
    """Copy every file under ``local`` to ``uri`` (same relative paths); large files stream."""
    fs, root = store.fs_and_path(uri)
    for dirpath, _, files in os.walk(local):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local)
            dst = f"{root.rstrip('/')}/{rel}"
            if store.scheme_of(uri) == "file":
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            store.with_retries(lambda: fs.put_file(src, dst), what=f"upload {src} -> {uri}/{rel}")


def _download_dir(uri: str, local: str, rank: int) -> None:
    """Copy the files under ``uri`` that ``rank`` reads (:func:`rank_reads`) into ``local``."""
    fs, root = store.fs_and_path(uri)
    root = root.rstrip("/")
    files = store.with_retries(lambda: fs.find(root), what=f"list {uri}")
    if not files:
        raise FileNotFoundError(f"checkpoint directory {uri} is empty")
    for path in files:
        rel = os.path.relpath(path, root)
        if not rank_reads(rel, rank):
            continue
        dst = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        store.with_retries(lambda: fs.get_file(path, dst), what=f"download {uri}/{rel}")
