"""The cluster configs in cluster/ and the submission helpers, checked without a cloud account.

Launcher YAMLs go through Ray's own validation (ray-schema.json + its semantic checks, after
filling in the provider defaults the way `ray up` does); KubeRay manifests are checked
structurally (no CRD schema offline). Across all of them: the worker groups the run specs need
exist, the resource names the specs ask for are offered, and the dashboard is not exposed.
"""
from __future__ import annotations

import json
import re
import os
import shlex
from pathlib import Path

import pytest
import yaml

from tests.support.specs import REPO

CLUSTER = REPO / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
# The resource names the specs use (cluster/README.md "Resources"): one per group.
CPU_GROUP_RESOURCE = "cpu_worker"
GPU_GROUP_RESOURCE = "accelerator_type:H100"


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _kube(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d.get('kind') for d in docs]}"
    return found[0]


def _kuberay_start_resources(group: dict) -> dict:
    """KubeRay pastes rayStartParams into a shell `ray start --resources=<value>` line, so the
    value is shell-quoted JSON: '"{\\"cpu_worker\\": 1}"'. Read it the way the shell will."""
    raw = (group.get("rayStartParams") or {}).get("resources")
    if raw is None:
        return {}
    words = shlex.split(raw)
    assert len(words) == 1, f"rayStartParams.resources must be one shell word: {raw!r}"
    return json.loads(words[0])


# --- Ray cluster launcher configs ---------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import fillout_defaults, merge_setup_commands, validate_config

    cfg = _load(name)
    validate_config(cfg)  # as written: schema, head_node_type, min/max workers
    # ...and as `ray up` sees it, merged with the provider's defaults (no cloud calls).
    validate_config(merge_setup_commands(fillout_defaults(cfg)))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_groups_resources_and_setup(name):
    cfg = _load(name)
    assert cfg["cluster_name"] and cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 8]
    cpu = [v for v in workers.values() if CPU_GROUP_RESOURCE in v["resources"]]
    assert len(gpu) == 1 and len(cpu) == 1, f"{name}: need one GPU and one CPU worker group, got {list(workers)}"
    assert gpu[0]["resources"].get(GPU_GROUP_RESOURCE) == 1
    assert "GPU" not in cpu[0]["resources"] and CPU_GROUP_RESOURCE not in gpu[0]["resources"]
    assert cpu[0].get("min_workers", 0) == 0 and gpu[0].get("min_workers", 0) == 0  # nothing idles on the bill
    assert sum(v.get("max_workers", 0) for v in workers.values()) <= cfg["max_workers"]
    if name == "aws.yaml":
        assert gpu[0]["node_config"]["InstanceType"].startswith("p5.")
    else:
        assert gpu[0]["node_config"]["machineType"].startswith("a3-")

    # The head does no stage work: CPU 0 in the autoscaler's view and in ray start.
    assert head["resources"].get("CPU") == 0
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start

    # The dashboard (the Jobs API: whoever reaches it runs code) stays on loopback.
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start

    # The project is shipped to every node and installed there, torch before DeepSpeed.
    mounts = cfg["file_mounts"]
    target = next(k for k, v in mounts.items() if v == ".")
    setup = cfg["setup_commands"]
    installs = [c for c in setup if "pip install" in c]
    assert any(target.replace("~", "$HOME") in c or target in c for c in installs if " -e " in c), setup
    torch_i = next(i for i, c in enumerate(setup) if "torch" in c)
    ds_i = next(i for i, c in enumerate(setup) if "deepspeed" in c)
    assert torch_i < ds_i and "--no-build-isolation" in setup[ds_i]
    assert any(".venv" in x for x in cfg["rsync_exclude"]) and any(".git" in x for x in cfg["rsync_exclude"])
    # Never credentials in a config that gets committed.
    text = (CLUSTER / name).read_text().lower()
    for word in ("aws_secret", "secret_access_key", "private_key", "password", "token:"):
        assert word not in text


# --- KubeRay ----------------------------------------------------------------------------

def _check_ray_cluster_spec(spec: dict, where: str) -> dict[str, dict]:
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"], where
    params = head["rayStartParams"]
    assert params.get("num-cpus") == "0", f"{where}: the head must not take stage work"
    if params.get("dashboard-host", "127.0.0.1") != "127.0.0.1":
        # 0.0.0.0 is needed in a pod (reached via the Service); then the Service must stay private.
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: dashboard exposed outside the cluster"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, name)
        c = g["template"]["spec"]["containers"][0]
        assert c["image"] and c["resources"]["limits"], (where, name)
    gpu = [g for g in groups.values()
           if str(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", "0")) == "8"]
    cpu = [g for g in groups.values() if CPU_GROUP_RESOURCE in _kuberay_start_resources(g)]
    assert len(gpu) == 1 and len(cpu) == 1, f"{where}: need one 8-GPU and one cpu_worker group"
    assert _kuberay_start_resources(gpu[0]).get(GPU_GROUP_RESOURCE) == 1
    return groups


def test_kuberay_raycluster_structure():
    rc = _one(_kube("raycluster.yaml"), "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")


def test_kuberay_rayjob_structure_and_entrypoint():
    from pipeline.run.submit import entrypoint_for

    docs = _kube("rayjob.yaml")
    job = _one(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    # The entrypoint is exactly what `t2i submit` runs, on the spec mounted from the ConfigMap.
    spec_path = shlex.split(spec["entrypoint"])[4]
    assert spec["entrypoint"] == entrypoint_for(spec_path)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if spec_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    cm = _one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert os.path.basename(spec_path) in cm["data"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_rayjob_spec_is_a_valid_run_spec():
    from pipeline.run.spec import parse_spec

    cm = _one(_kube("rayjob.yaml"), "ConfigMap")
    spec = parse_spec(yaml.safe_load(cm["data"]["run.yaml"]), "cluster/kuberay/rayjob.yaml")
    assert spec.store.uri.startswith("s3://")
    assert spec.download.resources == {CPU_GROUP_RESOURCE: 0.001}


# --- the specs ask only for resources the clusters offer ---------------------------------------

def _requested_resources(node, path="") -> dict[str, float]:
    """Every custom resource a spec asks for: ``resources: {...}`` maps and ``accelerator_type``."""
    out: dict[str, float] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "resources" and isinstance(v, dict):
                out.update({str(r): float(x) for r, x in v.items()})
            elif k == "accelerator_type" and isinstance(v, str):
                out[f"accelerator_type:{v}"] = 0.001
            else:
                out.update(_requested_resources(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for x in node:
            out.update(_requested_resources(x, path))
    return out


def _specs_using_resources() -> dict[str, dict]:
    specs = {}
    for p in sorted((REPO / "pipeline" / "configs").glob("*.yaml")):
        specs[f"pipeline/configs/{p.name}"] = yaml.safe_load(p.read_text())
    cm = _one(_kube("rayjob.yaml"), "ConfigMap")
    specs["cluster/kuberay/rayjob.yaml"] = yaml.safe_load(cm["data"]["run.yaml"])
    return specs


def _offered() -> dict[str, dict[str, float]]:
    out = {}
    for name in LAUNCHERS:
        cfg = _load(name)
        merged: dict[str, float] = {}
        for t in cfg["available_node_types"].values():
            for r, v in t["resources"].items():
                merged[r] = max(merged.get(r, 0), v)
        out[name] = merged
    for name, spec in (("raycluster.yaml", _one(_kube("raycluster.yaml"), "RayCluster")["spec"]),
                       ("rayjob.yaml", _one(_kube("rayjob.yaml"), "RayJob")["spec"]["rayClusterSpec"])):
        merged = {}
        for g in spec["workerGroupSpecs"]:
            for r, v in _kuberay_start_resources(g).items():
                merged[r] = max(merged.get(r, 0), v)
        out[name] = merged
    return out


def test_spec_resources_are_offered_by_every_cluster():
    requested = {src: _requested_resources(s) for src, s in _specs_using_resources().items()}
    assert requested["cluster/kuberay/rayjob.yaml"].get(CPU_GROUP_RESOURCE), "the example pins download to the cpu group"
    builtin = {"CPU", "GPU", "memory", "object_store_memory"}
    for cluster_name, offered in _offered().items():
        for src, req in requested.items():
            for r, amount in req.items():
                if r in builtin:
                    continue
                assert r in offered, f"{src} asks for resource {r!r}, which no group of {cluster_name} offers ({sorted(offered)})"
                assert amount <= offered[r], f"{src} asks {r}={amount}, more than one node of {cluster_name} has"


def test_cluster_readme_walks_from_nothing_to_a_run():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray up cluster/gcp.yaml", "ray dashboard cluster/aws.yaml",
                   "t2i submit", "t2i logs", "t2i stop", "t2i status", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                   "kubectl apply -f cluster/kuberay/rayjob.yaml", "port-forward", "cpu_worker", "accelerator_type",
                   "ray down"):
        assert needle in text, f"cluster/README.md should mention {needle!r}"


# --- submission helpers (no cluster needed) ------------------------------------------------

def test_dashboard_address_normalises_and_rejects_non_dashboard_addresses(monkeypatch):
    from pipeline.run.submit import SubmitError, dashboard_address, redact_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert dashboard_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert dashboard_address("https://ray.example.com/") == "https://ray.example.com"
    for bad in ("ray://head:10001", "auto"):
        with pytest.raises(SubmitError, match="dashboard"):
            dashboard_address(bad)
    with pytest.raises(SubmitError, match="--address"):
        dashboard_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265")
    assert dashboard_address(None) == "http://10.0.0.5:8265"
    assert redact_address("https://user:s3cret@host:8265/x") == "https://host:8265/x"


def test_submission_id_and_runtime_env(monkeypatch):
    from pipeline.run.runtime_env import pinned_requirements
    from pipeline.run.submit import build_runtime_env, project_requirements, project_root, submission_id_for

    assert submission_id_for("demo", now=0) == "t2i-demo-19700101-000000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-ship-me")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "never-ship-me-either")
    env = build_runtime_env("/tmp/x", pip=False)
    assert env["working_dir"] == "/tmp/x" and "pip" not in env
    for pattern in (".venv", "runs", "*.whl", ".git"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "never-ship" not in json.dumps(env)
    with_pip = build_runtime_env("/tmp/x", pip="pip")
    assert with_pip["pip"]["packages"] == pinned_requirements(project_root())
    names = lambda reqs: [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in reqs]  # noqa: E731
    assert names(with_pip["pip"]["packages"]) == names(project_requirements())
    assert any(p.startswith("torch==") for p in with_pip["pip"]["packages"])


def test_staged_working_dir_ships_checkout_plus_spec_without_touching_it():
    from pipeline.run.submit import SHIPPED_SPEC_DIR, project_root, staged_working_dir

    root = project_root()
    before = sorted(p.name for p in root.iterdir())
    with staged_working_dir(root, "r.yaml", "run_id: r\n") as wd:
        names = set(os.listdir(wd))
        assert {"pipeline", "pyproject.toml"} <= names and ".venv" not in names and ".git" not in names
        assert (Path(wd) / "pipeline" / "run" / "submit.py").exists()
        assert (Path(wd) / SHIPPED_SPEC_DIR / "r.yaml").read_text() == "run_id: r\n"
    assert not os.path.exists(wd)
    assert sorted(p.name for p in root.iterdir()) == before


def test_bad_spec_fails_before_any_network_call(tmp_path):
    from pipeline.run.spec import SpecError
    from pipeline.run.submit import SubmitError, submit_run

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_id: x\nstore: {{uri: 'file://{tmp_path}/store'}}\ndownload: {{url_list: demo, image_sizee: 3}}\n")
    # An address where nothing listens: a SpecError proves validation came first.
    with pytest.raises(SpecError, match="download.image_sizee"):
        submit_run(bad, "http://127.0.0.1:9")
    good = tmp_path / "good.yaml"
    good.write_text(f"run_id: x\nstore: {{uri: 'file://{tmp_path}/store'}}\ndownload: {{url_list: demo}}\n")
    with pytest.raises(SubmitError, match="127.0.0.1:9"):
        submit_run(good, "http://127.0.0.1:9")


def _gpu_node_shapes() -> dict[str, tuple[float, float]]:
    """(CPUs, GPUs) of one H100 node in each config."""
    shapes = {}
    for name in LAUNCHERS:
        t = next(v for v in _load(name)["available_node_types"].values() if v["resources"].get("GPU"))
        shapes[name] = (t["resources"]["CPU"], t["resources"]["GPU"])
    for name, spec in (("raycluster.yaml", _one(_kube("raycluster.yaml"), "RayCluster")["spec"]),
                       ("rayjob.yaml", _one(_kube("rayjob.yaml"), "RayJob")["spec"]["rayClusterSpec"])):
        for g in spec["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            if "nvidia.com/gpu" in limits:  # Ray takes CPU/GPU counts from the container limits
                shapes[name] = (float(limits["cpu"]), float(limits["nvidia.com/gpu"]))
    return shapes


def test_training_workers_fill_a_gpu_node():
    """Each training stage's workers must fit on an H100 node so that all 8 GPUs can be used:
    gpus_per_worker <= 8 and the CPUs of 8/gpus_per_worker workers <= the node's CPUs."""
    shapes = _gpu_node_shapes()
    assert set(shapes) == set(LAUNCHERS) | {"raycluster.yaml", "rayjob.yaml"}
    checked = 0
    for src, spec in _specs_using_resources().items():
        for stage, cfg in spec.items():
            if not (isinstance(cfg, dict) and cfg.get("gpus_per_worker")):
                continue
            gpw, cpw = float(cfg["gpus_per_worker"]), float(cfg.get("cpus_per_worker", 1))
            for cluster_name, (cpus, gpus) in shapes.items():
                per_node = gpus // gpw
                assert per_node >= 1, f"{src} {stage}: {gpw} GPUs per worker > {gpus} on a {cluster_name} node"
                assert per_node * cpw <= cpus, (f"{src} {stage}: {per_node:.0f} workers x {cpw} CPUs exceed the "
                                                f"{cpus} CPUs of a {cluster_name} GPU node; lower cpus_per_worker")
            checked += 1
    assert checked >= 1, "no spec with GPU training found in pipeline/configs"


def test_submit_warns_about_paths_only_this_machine_can_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run.spec import parse_spec
    from pipeline.run.submit import locality_warnings, project_root

    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a"]}), urls)
    local = parse_spec({"run_id": "r", "store": {"uri": f"file://{tmp_path}/store"},
                        "download": {"url_list": str(urls)}})
    warnings = locality_warnings(local, project_root())
    assert len(warnings) == 2
    assert "store.uri" in warnings[0] and "download.url_list" in warnings[1] and str(urls) in warnings[1]
    remote = parse_spec({"run_id": "r", "store": {"uri": "s3://bucket/runs"},
                         "download": {"url_list": "s3://bucket/urls.parquet"}})
    assert locality_warnings(remote, project_root()) == []
