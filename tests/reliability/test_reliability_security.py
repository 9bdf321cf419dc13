"""Security basics: safe YAML, nothing from the store unpickled, credentials never written or
printed, servers on loopback.

The credential test runs the real CLI (`t2i run`, then a failing `t2i resume`) as a subprocess
against moto's S3 server with AWS_SECRET_ACCESS_KEY set to a marker string, and looks for the
marker in everything the pipeline wrote or printed.
"""
from __future__ import annotations

import ast
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.run.planning import stage_uri
from pipeline import store
from tests.support.cli import t2i
from tests.support.specs import REPO, smoke_spec, tiny_embed, write_spec

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

CODE_DIRS = ("pipeline", "stages", "data_prep", "cluster")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def test_no_unsafe_yaml_or_unpickling_in_the_code():
    """yaml.safe_load only; np.load(allow_pickle=False); torch.load(weights_only=True); no pickle."""
    bad = []
    files = [p for d in CODE_DIRS for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    for p in files:
        tree = ast.parse(p.read_text(), str(p))
        for node, owner, name in _calls(tree):
            where = f"{p.relative_to(REPO)}:{node.lineno}"
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
                bad.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            if owner in ("pickle", "cloudpickle", "dill", "joblib") and name in ("load", "loads"):
                bad.append(f"{where}: {owner}.{name}")
            if owner == "np" and name == "load" and _kw(node, "allow_pickle") is not False:
                bad.append(f"{where}: np.load without allow_pickle=False")
            if owner == "torch" and name == "load" and _kw(node, "weights_only") is not True:
                bad.append(f"{where}: torch.load without weights_only=True")
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)


def test_pickled_embedding_shard_is_refused(tmp_path, reliability):
    """An npz from the store carrying a pickled object array is never unpickled: clear error."""
    from data_prep.embed_format import read_embedding_shard

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    buf = io.BytesIO()
    np.savez(buf, keys=np.array([Boom()], dtype=object), clip_image=np.zeros((1, 4), np.float16))
    uri = store.join(f"file://{tmp_path}", "00000.npz")
    store.write_bytes_atomic(uri, buf.getvalue())
    with pytest.raises(Exception) as ei:
        read_embedding_shard(uri)
    assert not (tmp_path / "pwned").exists(), "the pickle ran"
    assert "pickle" in str(ei.value).lower() or "00000.npz" in str(ei.value), str(ei.value)
    reliability.record(kind="bad_input", name="embedding shard with a pickled object array", survived=True,
                       detail=f"refused: {type(ei.value).__name__}")


def test_spec_yaml_tags_are_refused(tmp_path):
    from pipeline.run.spec import SpecError, load_spec

    p = tmp_path / "evil.yaml"
    p.write_text("run_id: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises((SpecError, yaml.YAMLError)):
        load_spec(str(p))


def test_demo_http_server_binds_loopback(tmp_path):
    from data_prep.http_server import DemoHTTPServer

    with DemoHTTPServer(str(tmp_path)) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        assert srv._httpd.server_address[0] == "127.0.0.1" if hasattr(srv, "_httpd") else True
    with pytest.raises(ValueError, match="127.0.0.1"):
        DemoHTTPServer(str(tmp_path), host="0.0.0.0")


def test_local_ray_binds_loopback_and_no_dashboard(monkeypatch):
    """init_ray's arguments for a local Ray: dashboard off by default and on loopback when on."""
    import ray

    from pipeline.run import ray_scheduler as ray_exec
    from pipeline.run.spec import ClusterConfig

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    ray_exec.init_ray(ClusterConfig(num_cpus=2))
    assert seen["address"] == "local" and seen["include_dashboard"] is False
    assert seen["dashboard_host"] == "127.0.0.1"
    # Not covered: Ray's own gRPC servers (gcs_server, raylet) listen on all interfaces whatever
    # _node_ip_address says (checked with psutil on Ray 2.60); Ray has no loopback-only switch.
    seen.clear()
    ray_exec.init_ray(ClusterConfig(num_cpus=2, include_dashboard=True))
    assert seen["include_dashboard"] is True and seen["dashboard_host"] == "127.0.0.1"


def _spec(tmp_path: Path, store_uri: str, encoders: Path) -> str:
    """The smoke spec's download and embed: 24 images at 32px with 10% bad rows, tiny encoders."""
    return write_spec(tmp_path / "spec.yaml", smoke_spec(
        only=("download", "embed"), run_id="sec", store={"uri": store_uri}, cluster={"use_ray": False},
        download={"demo": {"image_size": 32, "bad_fraction": 0.1}, "image_size": 32, "number_sample_per_shard": 8,
                  "min_success_rate": 0.5},
        embed=tiny_embed(encoders, max_length=16, batch_size=8)))


def test_credentials_never_written_or_printed(s3_bucket, tmp_path, reliability):
    marker = f"SECRET-{uuid.uuid4().hex}"
    env = {"AWS_SECRET_ACCESS_KEY": marker, "PYTHONUNBUFFERED": "1"}
    os.environ["AWS_SECRET_ACCESS_KEY"] = marker  # this process reads the bucket with the same key
    spec = _spec(tmp_path, s3_bucket, tmp_path / "enc")  # built by the run itself: scanned with the rest
    run = f"{s3_bucket}/sec"
    r1 = t2i("run", spec, env=env, cwd=tmp_path, timeout=240)
    assert r1.code == 0, r1.output
    # A failing stage too (its _ERROR.json and printed error): a truncated download shard.
    tar = store.glob(store.join(stage_uri(run, "download"), "shards", "*.tar"))[0]
    body = store.read_bytes(tar)
    store.write_bytes_atomic(tar, body[: len(body) // 2 + 100])
    r2 = t2i("rerun", run, "--stage", "embed", env=env, cwd=tmp_path, timeout=240)  # a new embed attempt over the damaged shard
    assert r2.code != 0
    out2 = r2.output
    assert "Traceback" not in out2, out2
    assert tar.rsplit("/", 1)[-1] in out2, f"the error names the truncated shard:\n{out2}"
    err = store.read_json(store.join(stage_uri(run, "embed"), "_ERROR.json"))
    assert not store.exists(store.join(stage_uri(run, "embed"), "_MANIFEST.json"))
    reliability.record(kind="bad_input", name="truncated tar shard at embed", survived=True,
                       detail=err["error"][:120])

    fs, root = store.fs_and_path(s3_bucket)
    written = fs.find(root)
    assert any(p.endswith("spec.yaml") for p in written) and any(p.endswith("_ERROR.json") for p in written)
    leaks = [p for p in written if marker.encode() in fs.cat_file(p)]
    leaks += [f"stdout/stderr of `t2i {a}`" for a, r in (("run", r1), ("resume", r2))
              if marker in r.stdout + r.stderr]
    leaks += [str(p) for p in tmp_path.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert not leaks, f"credential marker found in: {leaks}"
    reliability.record(kind="fault", name="secret key in the environment (marker string)", survived=True,
                       detail=f"absent from {len(written)} stored objects, logs and error files")
