"""After img2dataset: what actually landed, counted by reason, checked against the tars.

img2dataset's per-shard stats count a row as a success before its writer has stored it; a writer
that fails (a caption it cannot encode, a full disk) leaves a tar with fewer samples than the
stats say. So every shard's tar is counted (member headers only) and compared with its stats; a
difference fails the stage naming the shard and img2dataset's own error from its log. Rejected
rows are counted by reason from the per-shard parquet img2dataset writes (one row per URL, with
its status and error string), so the manifest says *why* each row was dropped.
"""
from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from data_prep.download.address_policy import REFUSED_MESSAGE
from data_prep.image_decode import reason_of
from data_prep.shards import ShardCorruptError, count_tar_samples, list_shards, read_shard_stats, shard_id
from pipeline import layout, store
from pipeline.context import StageFailed, StageResult

DEADLINE_MESSAGE = "request deadline exceeded"  # data_prep.download.child's error for a slow body
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are 00000.tar, 00001.tar, ...
# Every reason a row can be rejected for, so the manifest always has the same keys.
# address_policy: refused while fetching (a redirect to a refused address or scheme, a name that
# resolved to one on the worker); rows refused before img2dataset are the list's refused_<reason>.
REJECTION_REASONS = ("http_error", "timeout", "connection_error", "disallowed_by_header", "address_policy",
                     "too_large", "too_small", "aspect_ratio", "undecodable")


def download_reason(error: str) -> str:
    """Reason key for a row img2dataset counted as failed_to_download."""
    if "X-Robots-Tag" in error:
        return "disallowed_by_header"
    if REFUSED_MESSAGE in error:
        return "address_policy"
    if error.startswith("HTTP Error"):
        return "http_error"
    if DEADLINE_MESSAGE in error or "timed out" in error.lower():
        return "timeout"
    return "connection_error"  # refused, reset, DNS, TLS, a server that closed without answering


def retryable(status: str | None, error: str) -> bool:
    """A row whose download failed for a reason that may pass later: a timeout, a refused or reset
    connection, HTTP 408/425/429 or 5xx. Not a 404, not an image rejected for what it is."""
    if status != "failed_to_download":
        return False
    reason = download_reason(error)
    if reason in ("timeout", "connection_error"):
        return True
    m = re.match(r"HTTP Error (\d+)", error)
    return bool(m) and (int(m.group(1)) in (408, 425, 429) or int(m.group(1)) >= 500)


def shard_rows(shards_uri: str, s: str, st: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(status, error) of every row of a finished shard, from img2dataset's per-shard parquet
    (one row per URL); without that file, from the stats' (capped) error counter."""
    import pyarrow.parquet as pq  # heavy: pyarrow, only for the shards' parquet

    try:
        with store.open_uri(layout.shard_file(shards_uri, s, layout.SHARD_PARQUET), "rb") as f:
            t = pq.read_table(f, columns=["status", "error_message"]).to_pydict()
        return [(a, b or "") for a, b in zip(t["status"], t["error_message"])]
    except Exception:
        return [(None, msg) for msg, n in st.get("status_dict", {}).items() for _ in range(int(n))]


def _is_download_failure(status: str | None, msg: str) -> bool:
    if status is not None:
        return status == "failed_to_download"
    return reason_of(msg) == "undecodable" and not msg.startswith("Image decoding error")


def verify_tars(shards_uri: str, good: dict[str, dict[str, Any]], log_tail: str) -> dict[str, int]:
    """Samples in each finished shard's tar; StageFailed naming every shard whose tar disagrees
    with img2dataset's success count."""
    tars = {shard_id(u): u for u in list_shards(shards_uri)}

    def count(s: str) -> tuple[str, int | str]:
        try:
            return s, count_tar_samples(tars[s])
        except ShardCorruptError as e:
            return s, str(e)

    with ThreadPoolExecutor(max_workers=8) as pool:  # object-store latency bound, not CPU
        found = dict(pool.map(count, sorted(good)))
    bad = [(s, good[s]["successes"], n) for s, n in found.items() if n != good[s]["successes"]]
    if bad:
        what = "; ".join(f"shard {s}: img2dataset counted {want} successes but its tar "
                         + (f"holds {n}" if isinstance(n, int) else f"is unreadable ({n})") for s, want, n in bad)
        raise StageFailed(f"download: samples missing from the shards: {what}. img2dataset's error: "
                          f"{img2dataset_error(log_tail)}")
    return {s: int(n) for s, n in found.items()}


def img2dataset_error(log_tail: str) -> str:
    """The most telling lines of img2dataset's log (its per-sample and per-shard failures)."""
    pat = re.compile(r"(Sample \d+ failed to download: .*|shard \d+ failed with error .*|\w*Error: .*)")
    lines = list(dict.fromkeys(m.group(1).strip() for m in pat.finditer(log_tail)))
    return " | ".join(lines[-3:]) if lines else "none in its log (see img2dataset.log)"


@dataclass
class Pass:
    """One img2dataset run: its shards are first_id, first_id + 1, ... with these row counts."""

    first_id: int
    rows_per_shard: list[int]

    def ids(self) -> list[str]:
        return [f"{self.first_id + i:0{SHARD_DIGITS}d}" for i in range(len(self.rows_per_shard))]


def drop_unfinished(shards_uri: str, ids: list[str]) -> list[str]:
    """Remove the files of shards that never finished (no stats file, or no tar): their partial
    files must not look like output. Returns their ids."""
    stats = {shard_id(u) for u in store.glob(store.join(shards_uri, "*" + layout.SHARD_STATS))}
    tars = {shard_id(u) for u in list_shards(shards_uri)}
    failed = [s for s in ids if s not in stats or s not in tars]
    for s in failed:
        for ext in (layout.SHARD_TAR, layout.SHARD_PARQUET, layout.SHARD_STATS):
            store.remove(layout.shard_file(shards_uri, s, ext))
    return failed


def summarize(shards_uri: str, rows_per_shard: list[int], min_success_rate: float, elapsed: float,
              log_tail: str = "", list_counts: dict[str, int] | None = None, passes: list[Pass] | None = None):
    """Counts and metrics of finished img2dataset run(s), or StageFailed (short shards, no samples
    at all, success rate under the threshold).

    With several ``passes`` (retries of the failed rows into new shards) every row counts once, by
    its last outcome: a retryable failure of an earlier pass, and every row of an earlier pass's
    unfinished shards, was fetched again later and is counted there.
    """
    passes = passes or [Pass(0, list(rows_per_shard))]
    stats = read_shard_stats(shards_uri)
    counts: dict[str, int] = dict(list_counts or {})
    c = Counter({"successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "rows_in_failed_shards": 0,
                 "shards": 0, "failed_shards": 0, **{f"rejected_{r}": 0 for r in REJECTION_REASONS}})
    good_all: dict[str, dict[str, Any]] = {}
    failed_all: list[str] = []
    for n, p in enumerate(passes):
        last = n == len(passes) - 1
        failed = drop_unfinished(shards_uri, p.ids())
        good = {s: stats[s] for s in p.ids() if s not in failed}
        verify_tars(shards_uri, good, log_tail)
        for s, st in good.items():
            c["successes"] += int(st["successes"])
            if n > 0:
                c["retry_successes"] += int(st["successes"])
            for status, msg in shard_rows(shards_uri, s, st):
                if status == "success" or (not last and retryable(status, msg)):
                    continue  # a success, or fetched again by the next pass
                if _is_download_failure(status, msg):
                    c["failed_to_download"] += 1
                    c[f"rejected_{download_reason(msg)}"] += 1
                else:
                    c["failed_to_resize"] += 1
                    c[f"rejected_{reason_of(msg)}"] += 1
        if last:
            c["rows_in_failed_shards"] += sum(p.rows_per_shard[int(s) - p.first_id] for s in failed)
            failed_all += failed
        c["shards"] += len(good)
        c["failed_shards"] += len(failed)
        good_all.update(good)
    counts.update(c)
    counts["total"] = sum(passes[0].rows_per_shard)
    if len(passes) > 1:
        counts["retried_rows"] = sum(sum(p.rows_per_shard) for p in passes[1:])
        counts["retry_passes"] = len(passes) - 1
        counts.setdefault("retry_successes", 0)
    rate = counts["successes"] / max(1, counts["total"])
    metrics = {"success_rate": rate, "images_per_s": counts["total"] / max(elapsed, 1e-9),
               "download_seconds": elapsed}
    if counts["successes"] == 0 or rate < min_success_rate:
        raise StageFailed(_failure_message(counts, good_all, failed_all, rate, min_success_rate))
    return StageResult(counts=counts, metrics=metrics, outputs={"shards": shards_uri})


def _failure_message(counts: dict[str, int], good: dict[str, dict[str, Any]], failed_shards: list[str],
                     rate: float, min_success_rate: float) -> str:
    errors: Counter[str] = Counter()
    for st in good.values():
        errors.update({k: v for k, v in st.get("status_dict", {}).items() if k != "success"})
    top = "; ".join(f"{msg!r} x{n}" for msg, n in errors.most_common(5)) or "none recorded"
    worst = sorted(good.items(), key=lambda kv: kv[1]["successes"] / max(1, kv[1]["count"]))[:3]
    worst_s = ", ".join(f"{s} ({st['successes']}/{st['count']} ok)" for s, st in worst)
    reasons = ", ".join(f"{k[len('rejected_'):]} {v}" for k, v in counts.items() if k.startswith("rejected_") and v)
    if counts["successes"] == 0:
        msg = f"download: none of the {counts['total']} rows became a sample (the stage would finish empty)."
    else:
        msg = (f"download: success rate {rate:.1%} ({counts['successes']}/{counts['total']} rows) is below "
               f"min_success_rate {min_success_rate:.1%}.")
    msg += f" Most common errors: {top}."
    if reasons:
        msg += f" Rejected by reason: {reasons}."
    if worst_s:
        msg += f" Worst shards: {worst_s}."
    if failed_shards:
        msg += f" Shards that did not finish (see img2dataset.log): {', '.join(failed_shards)}."
    return msg
