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
from typing import Any

from data_prep.image_decode import reason_of
from data_prep.shards import ShardCorruptError, count_tar_samples, list_shards, read_shard_stats, shard_id
from pipeline import store
from pipeline.context import StageFailed

DEADLINE_MESSAGE = "request deadline exceeded"  # data_prep.download_child's error for a slow body
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are 00000.tar, 00001.tar, ...
# Every reason a row can be rejected for, so the manifest always has the same keys.
REJECTION_REASONS = ("http_error", "timeout", "connection_error", "disallowed_by_header", "too_large", "too_small",
                     "aspect_ratio", "undecodable")


def download_reason(error: str) -> str:
    """Reason key for a row img2dataset counted as failed_to_download."""
    if "X-Robots-Tag" in error:
        return "disallowed_by_header"
    if error.startswith("HTTP Error"):
        return "http_error"
    if DEADLINE_MESSAGE in error or "timed out" in error.lower():
        return "timeout"
    return "connection_error"  # refused, reset, DNS, TLS, a server that closed without answering


def rejection_counts(shards_uri: str, good: dict[str, dict[str, Any]]) -> Counter[str]:
    """``rejected_<reason>`` for every row of the finished shards that did not become a sample."""
    import pyarrow.parquet as pq

    out: Counter[str] = Counter({f"rejected_{r}": 0 for r in REJECTION_REASONS})
    for s, st in good.items():
        uri = store.join(shards_uri, f"{s}.parquet")
        try:
            with store.open_uri(uri, "rb") as f:
                t = pq.read_table(f, columns=["status", "error_message"]).to_pydict()
            rows = zip(t["status"], t["error_message"])
        except Exception:  # no per-row file: fall back to the stats' (capped) error counter
            rows = ((None, msg) for msg, n in st.get("status_dict", {}).items() if msg != "success" for _ in range(n))
        for status, msg in rows:
            if status == "success":
                continue
            msg = msg or ""
            if status == "failed_to_download" or (status is None and _looks_like_download_error(msg)):
                out[f"rejected_{download_reason(msg)}"] += 1
            else:
                out[f"rejected_{reason_of(msg)}"] += 1
    return out


def _looks_like_download_error(msg: str) -> bool:
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


def summarize(shards_uri: str, rows_per_shard: list[int], min_success_rate: float, elapsed: float,
              log_tail: str = "", list_counts: dict[str, int] | None = None):
    """Counts and metrics of a finished img2dataset run, or StageFailed (unfinished or short shards,
    no samples at all, success rate under the threshold)."""
    from pipeline.context import StageResult

    stats = read_shard_stats(shards_uri)
    tars = {shard_id(u) for u in list_shards(shards_uri)}
    expected = [f"{i:0{SHARD_DIGITS}d}" for i in range(len(rows_per_shard))]
    # A shard with no stats file (or no tar) never finished: its partial files must not look like
    # output, and all its rows count as failures.
    failed_shards = [s for s in expected if s not in stats or s not in tars]
    for s in failed_shards:
        for ext in (".tar", ".parquet", "_stats.json"):
            store.remove(store.join(shards_uri, s + ext))
    good = {s: st for s, st in stats.items() if s not in failed_shards}
    verify_tars(shards_uri, good, log_tail)
    counts = dict(list_counts or {})
    counts.update({
        "total": sum(rows_per_shard),
        "successes": sum(int(st["successes"]) for st in good.values()),
        "failed_to_download": sum(int(st["failed_to_download"]) for st in good.values()),
        "failed_to_resize": sum(int(st["failed_to_resize"]) for st in good.values()),
        "rows_in_failed_shards": sum(rows_per_shard[int(s)] for s in failed_shards),
        "shards": len(good),
        "failed_shards": len(failed_shards),
    })
    counts.update(rejection_counts(shards_uri, good))
    total = max(1, counts["total"])
    rate = counts["successes"] / total
    metrics = {"success_rate": rate, "images_per_s": counts["total"] / max(elapsed, 1e-9),
               "download_seconds": elapsed}
    if counts["successes"] == 0 or rate < min_success_rate:
        raise StageFailed(_failure_message(counts, good, failed_shards, rate, min_success_rate))
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
