"""A real multi-node Ray cluster on this machine, started with ``ray start`` like a real one.

Each node is its own ``ray start --block`` process with its own ``--temp-dir`` (Ray >= 2.x
accepts a temp dir per node) under one private root, and its own free ports (GCS, dashboard,
dashboard agent, client server), so it never collides with another engineer's Ray on the same
machine, nor with the default /tmp/ray. Ray writes ``ray_current_cluster`` into *its own* temp
dir, so ``ray.init(address="auto")`` elsewhere never finds this cluster.

Teardown never runs ``ray stop``: that kills every Ray process on the machine, including other
people's test clusters. Instead each node's ``ray start --block`` process is sent SIGTERM (with
--block, Ray ties the node's processes to it and stops them on exit), and then every process we
can attribute to this cluster -- descendants of those processes recorded while they were alive,
plus any process whose command line names our private root -- is killed by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


from pipeline.executors import free_port  # noqa: E402  (the one free-port helper)


def cluster_env(root: str) -> dict[str, str]:
    """Environment of the node processes: this venv first on PATH (a job's ``python`` entrypoint
    must be the interpreter that has the project's dependencies, as on a real cluster image) and
    no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Explicit, because Ray (>= 2.5x) turns token auth on for `ray start --head` whenever
    # ~/.ray/auth_token exists -- which any local ray.init() on this machine creates -- while the
    # joining node and our clients would not send the token. A loopback test cluster needs no
    # auth; a real cluster should use RAY_AUTH_MODE=token (cluster/README.md).
    env["RAY_AUTH_MODE"] = "disabled"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TMPDIR"] = os.path.join(root, "tmp")  # job drivers' and stages' scratch stays in our root
    return env


@dataclass
class NodeProc:
    name: str
    temp_dir: str
    proc: subprocess.Popen
    log_path: str
    resources: dict = field(default_factory=dict)


class LocalRayCluster:
    """A head node plus worker nodes, each a ``ray start --block`` child of this process."""

    def __init__(self, root: str | None = None):
        # Short root: Ray's unix socket paths live under it and must stay under ~107 bytes.
        self.root = root or tempfile.mkdtemp(prefix="t2i-rc-", dir="/tmp")
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        self.env = cluster_env(self.root)
        self.nodes: list[NodeProc] = []
        self._pids: set[int] = set()
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()

    # -- addresses --------------------------------------------------------------------------
    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    # -- start ------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], resources: dict | None) -> NodeProc:
        temp_dir = os.path.join(self.root, name)
        log_path = os.path.join(self.root, f"{name}.log")
        cmd = [str(VENV_BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--num-cpus=1",
               "--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats",
               "--min-worker-port=0", "--max-worker-port=0",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               *args]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root, start_new_session=True)
        node = NodeProc(name, temp_dir, proc, log_path, resources or {})
        self.nodes.append(node)
        self._pids.add(proc.pid)
        return node

    def start_head(self, resources: dict | None = None) -> NodeProc:
        return self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                    f"--ray-client-server-port={self.client_port}"], resources)

    def add_node(self, name: str, resources: dict | None = None) -> NodeProc:
        return self._start(name, [f"--address={self.gcs_address}"], resources)

    def wait_until_up(self, n_nodes: int, timeout: float = 90.0) -> list[dict]:
        """Until the dashboard answers and lists ``n_nodes`` ALIVE nodes; returns them."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited with {node.proc.returncode}:\n"
                                       f"{Path(node.log_path).read_text()[-3000:]}")
            self._record_descendants()
            try:
                nodes = [n for n in list_nodes(address=self.dashboard_url, timeout=5, raise_on_missing_output=False)
                         if n.state == "ALIVE"]
                if len(nodes) >= n_nodes and self._jobs_api_up():
                    return [{"node_id": n.node_id, "node_ip": n.node_ip, "is_head": n.is_head_node,
                             "resources": dict(n.resources_total)} for n in nodes]
            except Exception as e:  # noqa: BLE001 - the dashboard takes a while to come up
                last_err = e
            time.sleep(0.5)
        raise TimeoutError(f"cluster at {self.dashboard_url} not up with {n_nodes} nodes in {timeout}s: {last_err}\n"
                           + "\n".join(Path(n.log_path).read_text()[-1500:] for n in self.nodes))

    def _jobs_api_up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=3) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001
            return False

    # -- teardown ---------------------------------------------------------------------------
    def _record_descendants(self) -> None:
        for pid in list(self._pids):
            try:
                for child in psutil.Process(pid).children(recursive=True):
                    self._pids.add(child.pid)
            except psutil.Error:
                pass

    def _ours(self) -> list[psutil.Process]:
        """Live processes of this cluster: recorded PIDs (checked against their start time would be
        ideal; a recycled PID is guarded by also requiring our root or our venv in the cmdline) plus
        anything naming our private root."""
        found: dict[int, psutil.Process] = {}
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == me:
                continue
            cmd = " ".join(p.info.get("cmdline") or [])
            if self.root in cmd or (p.pid in self._pids and ("ray" in cmd or str(VENV_BIN) in cmd)):
                found[p.pid] = p
        return list(found.values())

    def shutdown(self, grace_s: float = 10.0) -> list[int]:
        """Stop every process of this cluster, by PID; returns PIDs that had to be SIGKILLed."""
        self._record_descendants()
        for node in reversed(self.nodes):  # workers first, then the head
            if node.proc.poll() is None:
                try:
                    os.kill(node.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        killed = []
        # Give the node processes' own cleanup a moment, then kill what is left, by PID.
        _, alive = psutil.wait_procs(self._ours(), timeout=max(0.5, deadline - time.monotonic()))
        for p in alive:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        return killed

    def remove_files(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{Path(n.log_path).read_text()[-2000:]}" for n in self.nodes
                         if os.path.exists(n.log_path))
