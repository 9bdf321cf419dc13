"""``t2i bench scale``: does the control plane keep up at tens of thousands of shards?

Builds a synthetic *finished* run on the store with N download shards, N embedding shards and
their done markers, checkpoints and manifests, laid out exactly as the stages lay them out
(pipeline/layout.py: ``<run>/<stage>/<fp12>/``, the attempt names ``plan_stages`` computes for
the spec), plus a half-finished embed (every other shard done), then times what a user waits
for at that size:

* ``status_s``      ``t2i status`` (pipeline/run/planning.py ``run_status``);
* ``plan_s``        ``t2i run`` on the finished run: planning and nothing to do (``run_pipeline``);
* ``manifest_s``    writing the embed stage's manifest (``list_outputs`` over its 2N files);
* ``resume_s``      a resumed embed finding its unfinished shards (``list_sources`` + ``is_done``);
* ``pair_s``        the training loader pairing tars with npz files (``pair_shards``);
* ``checkpoint_s``  the latest complete checkpoint (``CheckpointManager.latest``, what both a
  resume and the pruning after a save list).

Only the layout is real; the contents are tiny (one sample per shard), so the figures are the
store round trips and the Python around them. It sits on the CLI floor because it drives the
orchestration modules (planning, runner) from outside, as ``t2i`` does.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np

from data_prep.embed_format import EmbeddingShard, to_npz_bytes
from data_prep.encoders_doc import EncodersDoc, write_encoders_doc
from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.run.planning import plan_stages, run_status
from pipeline.run.runner import run_pipeline, save_spec
from pipeline.run.spec import load_spec, run_uri

OPERATIONS = ("status", "plan", "manifest", "resume", "pair", "checkpoint")
TRAIN_STEPS = 4


def _tiny_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for ext, data in (("jpg", b"\xff\xd8\xff\xd9"), ("txt", b"a red circle"), ("json", b"{}")):
            info = tarfile.TarInfo(f"000000000.{ext}")
            info.size, info.mtime = len(data), time.time()
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tiny_npz() -> bytes:
    f = np.float16
    return to_npz_bytes(EmbeddingShard(keys=np.array(["000000000"]), clip_image=np.zeros([1, 4], f),
                                       clip_text=np.zeros([1, 4], f), clip_tokens=np.zeros([2, 4], f),
                                       clip_lengths=np.array([2]), t5_tokens=np.zeros([2, 4], f),
                                       t5_lengths=np.array([2])))


class _Writer:
    """Many small files, fast: plain writes on a local store (no fsync: the build is not timed
    and not a real run), one concurrent batch of PUTs per call on an object store."""

    def __init__(self, root_uri: str):
        self.fs, _ = store.fs_and_path(root_uri)
        self.local = store.scheme_of(root_uri) == "file"
        self.pending: dict[str, bytes] = {}

    def put(self, uri: str, data: bytes) -> None:
        self.pending[store.fs_and_path(uri)[1]] = data
        if len(self.pending) >= 2000:
            self.flush()

    def flush(self) -> None:
        if self.local:
            for path, data in self.pending.items():
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        elif self.pending:
            self.fs.pipe(self.pending)
        self.pending = {}


def _spec(root_uri: str, n: int):
    return load_spec(os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml"),
                     {"run_id": f"scale-{n}", "store.uri": root_uri, "cluster.use_ray": False,
                      "download.number_sample_per_shard": 1, "sample": None})


def build_run(root_uri: str, n: int) -> dict[str, Any]:
    """The synthetic finished run of ``n`` shards, and a half-finished embed beside it."""
    from data_prep.embed.ledger import embed_identity  # torch (the encoders): t2i --help must not load it

    spec = _spec(root_uri, n)
    ruri = run_uri(spec)
    save_spec(spec)
    plans = plan_stages(spec)
    w = _Writer(root_uri)
    tar, npz = _tiny_tar(), _tiny_npz()
    dl_shards = store.join(plans["download"].attempt_uri, layout.SHARDS)
    emb_shards = store.join(plans["embed"].attempt_uri, layout.SHARDS)
    half = store.join(root_uri, f"scale-{n}-resume", layout.SHARDS)
    identity = embed_identity(spec.embed)
    for i in range(n):
        name = f"{i:05d}"
        w.put(layout.shard_file(dl_shards, name, layout.SHARD_TAR), tar)
        w.put(layout.shard_file(dl_shards, name, layout.SHARD_STATS), b'{"count": 1, "successes": 1}')
        marker = json.dumps({"shard": name, "source": layout.shard_file(dl_shards, name, layout.SHARD_TAR),
                             "source_size": len(tar),
                             "counts": {"n_total": 1, "n_embedded": 1}, "npz_bytes": len(npz),
                             "dims": {"clip_dim": 4, "clip_token_dim": 4, "t5_dim": 4},
                             "encoders": identity}).encode()
        for out in (emb_shards, half) if i % 2 == 0 else (emb_shards,):
            w.put(layout.shard_file(out, name, layout.EMBED_NPZ), npz)
            w.put(layout.shard_file(out, name, layout.EMBED_DONE), marker)
    write_encoders_doc(plans["embed"].attempt_uri, EncodersDoc(
        identity=identity, clip=spec.embed.clip.model_dump(), t5=spec.embed.t5.model_dump(),
        clip_dim=4, clip_token_dim=4, t5_dim=4, shards=[{"shard": f"{i:05d}", "size": len(tar)} for i in range(n)]))
    n_ckpt = 3 + n // 1000   # keep_last, plus an extended run's earlier finished checkpoints
    for stage, p in plans.items():
        if not stage.startswith("train_"):
            continue
        for k in range(n_ckpt):
            d = layout.checkpoint_dir(p.attempt_uri, k + 1)
            for rel in (f"{layout.CHECKPOINT_DEEPSPEED}/mp_rank_00_model_states.pt", layout.checkpoint_state(0),
                        layout.checkpoint_rng(0), layout.CHECKPOINT_EMA, layout.CHECKPOINT_COMPLETE):
                w.put(store.join(d, rel), b"{}")
        w.put(store.join(layout.final_dir(p.attempt_uri, TRAIN_STEPS), layout.FINAL_WEIGHTS), b"0")
    w.flush()
    for stage, p in plans.items():   # manifests last, as the stages do
        outputs = {"download": {"shards": dl_shards}, "embed": {"shards": emb_shards}}.get(
            stage, {"final": layout.final_dir(p.attempt_uri, TRAIN_STEPS)})
        _manifest(p, stage, outputs)
        layout.write_current(ruri, stage, p.attempt_uri)
    return {"spec": spec, "run": ruri, "plans": plans, "download_shards": dl_shards, "embed_shards": emb_shards,
            "half_embed": half, "identity": identity}


def _manifest(p, stage: str, outputs: dict[str, str]) -> dict:
    return mf.write_manifest(p.attempt_uri, stage=stage, fp=p.fingerprint, started_at=time.time(), counts={},
                             metrics={}, outputs=outputs, node={"hostname": "bench"}, config={}, extent=p.extent,
                             output_id=p.output_id, inputs=p.input_ids)


REPEATS = 3
# HTTP requests the moto server has answered (set while moto_store runs): on S3 the figure that
# scales is round trips; moto's own listing scans the whole bucket per page, so its seconds grow
# faster than a real S3's would.
_requests: list[int] | None = None


def _best_of(out: dict[str, float], key: str, fn: Callable[[], Any], repeats: int, fs=None) -> Any:
    """Run ``fn`` ``repeats`` times; keep the fastest (the box is shared: the minimum is the
    operation, the rest is other load) and the last result. s3fs caches listings in the process:
    dropped before each run, so every listing is a real round trip, as in a fresh process."""
    best, res = float("inf"), None
    for _ in range(repeats):
        if fs is not None:
            fs.invalidate_cache()
        r0 = _requests[0] if _requests is not None else 0
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
        if _requests is not None:
            out[f"{key}_requests"] = _settled(_requests) - r0
    out[f"{key}_s"] = best
    return res


def _settled(counter: list[int], quiet_s: float = 0.1, limit_s: float = 3.0) -> int:
    """The request count once the server has logged everything (it logs just after answering)."""
    end, last = time.monotonic() + limit_s, -1
    while counter[0] != last and time.monotonic() < end:
        last = counter[0]
        time.sleep(quiet_s)
    return counter[0]


def time_operations(run: dict[str, Any], repeats: int = REPEATS) -> dict[str, float]:
    import torch  # torch: t2i --help must not load it

    from data_prep.embed.ledger import is_done, list_sources  # torch (the encoders): t2i --help must not load it
    from stages.training.checkpoint import CheckpointManager  # torch: t2i --help must not load it
    from stages.training.loader import pair_shards  # torch: t2i --help must not load it

    out: dict[str, float] = {}
    fs = store.fs_and_path(run["run"])[0]
    _best = functools.partial(_best_of, fs=fs)
    rows = _best(out, "status", lambda: run_status(run["run"]), repeats)
    if any(r["state"] != "done" for r in rows):
        raise RuntimeError(f"bench scale: the synthetic run is not finished: {[(r['stage'], r['state']) for r in rows]}")
    summary = _best(out, "plan", lambda: run_pipeline(run["spec"], log=lambda m: None), repeats)
    if any(o.status != "skipped" for o in summary.outcomes.values()):
        raise RuntimeError("bench scale: a no-op run ran a stage")
    _best(out, "manifest", lambda: _manifest(run["plans"]["embed"], "embed", {"shards": run["embed_shards"]}), repeats)

    def resume() -> tuple[list, list]:
        sources = list_sources(run["download_shards"])
        return sources, [s for s in sources if not is_done(run["half_embed"], s, run["identity"])]
    sources, todo = _best(out, "resume", resume, repeats)
    if not todo or todo[0]["shard"] != "00001" or len(todo) != len(sources) // 2:
        raise RuntimeError(f"bench scale: resume found {len(todo)} unfinished shards, expected {len(sources) // 2}")
    pairs = _best(out, "pair", lambda: pair_shards(run["download_shards"], run["embed_shards"]), repeats)
    if len(pairs) != len(sources):
        raise RuntimeError(f"bench scale: {len(pairs)} shard pairs for {len(sources)} shards")
    mgr = CheckpointManager(run["plans"]["train_base"].attempt_uri, keep_last=3, every_steps=1, every_minutes=0,
                            rank=0, world_size=1, device=torch.device("cpu"))
    latest = _best(out, "checkpoint", mgr.latest, repeats)
    if latest is None or latest[0] != 3 + len(sources) // 1000:
        raise RuntimeError(f"bench scale: latest complete checkpoint {latest}, expected step {3 + len(sources) // 1000}")
    return out


def bench_scale(sizes: list[int], store_uri: str, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """``{"results": {"N": {"<op>_s": seconds}}, "growth": {"<op>_s": ratio}}`` (growth: last / first size)."""
    results: dict[str, dict[str, float]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        run = build_run(store_uri, n)
        progress(f"built a {n}-shard run in {time.perf_counter() - t0:.1f}s; timing")
        results[str(n)] = time_operations(run)
    first, last = results[str(sizes[0])], results[str(sizes[-1])]
    growth = {k: last[k] / max(first[k], 1e-9) for k in first} if len(sizes) > 1 else {}
    return {"results": results, "growth": growth, "sizes": sizes, "store": store.scheme_of(store_uri),
            "shards_ratio": sizes[-1] / sizes[0]}


@contextmanager
def moto_store():
    """A bucket on a moto S3 server on 127.0.0.1 (the real S3 API, in this process); yields its URI."""
    import socket
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer  # optional: moto is in the test extra, needed by --store s3 only

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    global _requests
    counter = [0]

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            counter[0] += 1

    log = logging.getLogger("werkzeug")   # moto's server logs every request: counted, not printed
    handler = _Count()
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.propagate = False
    _requests = counter
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"t2i-scale-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        _requests = None
        log.removeHandler(handler)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
