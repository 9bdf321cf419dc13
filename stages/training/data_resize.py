"""The data position across a change of world size (or of loader workers): every sample of the
interrupted epoch is trained exactly once, however the ranks change.

A rank's data position (stages/training/loader.py) is, per logical worker, where it stands in
its own list of units for an epoch; the lists depend on the number of logical workers ``G =
ranks x loader workers``. When a run resumes with another ``G`` those lists no longer exist, so
the samples not yet consumed are computed from every old worker's position and handed out
again as an explicit *plan*:

1. ``E_hi``: the furthest epoch any old worker had started. For each old worker, what it had not
   consumed in epochs up to ``E_hi``: the rest of its current unit (from the saved row), its
   later units, and all its units of the epochs it had not reached (plus, after an earlier
   change, the rest of its own plan). The union over the old workers is exactly what the epochs
   up to ``E_hi`` still owe; nothing else is.
2. These *fragments* (epoch, shard, first row, row stride, start row) are dealt out in order to
   the ``G'`` new workers: whole fragments round-robin when there are at least ``G'`` of them,
   else each fragment is split ``G'`` ways by row (stride x ``G'``), the rule the loader uses for
   fewer shards than workers.
3. A new worker walks its plan first, then epochs ``E_hi + 1, ...`` with the usual split for ``G'``.

A change during a plan composes: a worker's plan remainder is part of what it has not consumed.
Crops and flips are drawn per (seed, epoch, shard, row), so a sample keeps its augmentation when
it moves to another worker.
"""
from __future__ import annotations

from typing import Any

from stages.training.loader import units_of_epoch

Fragment = list  # [epoch, shard position, start row, first row, row stride]


def default_position(plan: list[Fragment]) -> dict[str, int]:
    """Where a worker that has not yielded a batch yet stands: the start of its plan, or of epoch 0."""
    return {"plan": 0, "index": 0} if plan else {"epoch": 0, "cursor": 0, "index": 0}


def _workers(state: dict[str, Any], rank: int) -> list[tuple[int, list[Fragment], dict, int]]:
    """(logical worker, plan, position, epoch after the plan) for each loader worker of one old rank."""
    K = int(state["workers"])
    plans = state.get("plans") or {}
    out = []
    for w in range(K):
        plan = [list(f) for f in plans.get(str(w), [])]
        pos = state.get("positions", {}).get(str(w)) or default_position(plan)
        out.append((rank * K + w, plan, pos, int(state.get("plan_next_epoch", 0))))
    return out


def _remaining(plan: list[Fragment], pos: dict, next_epoch: int, g: int, G: int, e_hi: int, n_shards: int,
               seed: int) -> list[Fragment]:
    """What old worker g of G had not consumed of the epochs up to ``e_hi``."""
    out: list[Fragment] = []
    if "plan" in pos:
        cursor, index = int(pos["plan"]), int(pos["index"])
        for i, (e, s, begin, first, stride) in enumerate(plan[cursor:]):
            out.append([e, s, max(begin, index) if i == 0 else begin, first, stride])
        epoch, cursor, index = next_epoch, 0, 0
    else:
        epoch, cursor, index = int(pos["epoch"]), int(pos["cursor"]), int(pos["index"])
    while epoch <= e_hi:
        for i, (s, first, stride) in enumerate(units_of_epoch(n_shards, epoch, g, G, seed)[cursor:]):
            out.append([epoch, s, index if i == 0 else 0, first, stride])
        epoch, cursor, index = epoch + 1, 0, 0
    return out


def redistribute(old: list[dict[str, Any]], *, n_shards: int, seed: int, workers: int,
                 world_size: int) -> list[dict[str, Any]]:
    """Every new rank's data state (``len == world_size``) from every old rank's (``old[r]`` is
    rank r's saved ``data`` state; see the module doc)."""
    K_new = max(1, workers)
    G_old = sum(int(s["workers"]) for s in old)
    G_new = world_size * K_new
    olds = [wk for r, s in enumerate(old) for wk in _workers(s, r)]
    e_hi = max(int(pos["epoch"]) if "epoch" in pos else nxt - 1 for _, _, pos, nxt in olds)
    frags = sorted(((f, g) for g, plan, pos, nxt in olds
                    for f in _remaining(plan, pos, nxt, g, G_old, e_hi, n_shards, seed)),
                   key=lambda fg: (fg[0][0], fg[1]))  # by epoch, then old worker (kept in its order)
    plans: list[list[Fragment]] = [[] for _ in range(G_new)]
    if len(frags) >= G_new:
        for i, (f, _) in enumerate(frags):
            plans[i % G_new].append(f)
    else:
        for f, _ in frags:
            e, s, begin, first, stride = f
            for j in range(G_new):
                plans[j].append([e, s, begin, first + stride * j, stride * G_new])
    samples = sum(int(s.get("samples", 0)) for s in old)
    return [{"workers": K_new, "world_size": world_size, "consumed": 0, "positions": {},
             "plans": {str(w): plans[r * K_new + w] for w in range(K_new) if plans[r * K_new + w]},
             "plan_next_epoch": e_hi + 1, "samples": samples if r == 0 else 0,
             "resized_from": {"world_size": len(old), "workers": int(old[0]["workers"])}}
            for r in range(world_size)]
