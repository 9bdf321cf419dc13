"""Cleans up after a driver that was killed without a chance to clean up (SIGKILL)."""
from __future__ import annotations

import subprocess
import sys
import os

# A driver killed with SIGKILL cleans up nothing: img2dataset's multiprocessing workers (no-Ray
# runs) and a local Ray's ray::DashboardAgent / ray::RuntimeEnvAgent and stage tasks still
# embedding (Ray runs; gcs_server and raylet do share the driver's fate) were seen to outlive it. A small watcher in its own session keeps a
# list of what this driver started after the watcher itself, and kills what is left once the
# driver is gone (TERM, then KILL). It never touches processes older than itself or outside
# the driver's process tree, and it exits with the driver.
_REAPER_CODE = r"""
import os, select, sys, time
import psutil
me, driver = os.getpid(), psutil.Process(int(sys.argv[1]))
t0 = psutil.Process(me).create_time() - 1.0
known = {}
while True:
    try:
        for p in driver.children(recursive=True):
            if p.pid != me and p.create_time() >= t0:
                known[p.pid] = p
    except psutil.Error:
        pass
    r, _, _ = select.select([sys.stdin], [], [], 0.5)
    if (r and not os.read(sys.stdin.fileno(), 4096)) or not driver.is_running():
        break
deadline = time.monotonic() + 3
while driver.is_running() and time.monotonic() < deadline:  # a normal exit: give ray.shutdown its time
    time.sleep(0.2)
left = [p for p in known.values() if p.is_running()]
for p in left:
    try: p.terminate()
    except psutil.Error: pass
_, left = psutil.wait_procs(left, timeout=3)
for p in left:
    try: p.kill()
    except psutil.Error: pass
"""
_reaper = None  # kept referenced: dropping the Popen would close its stdin and trigger it early


def start_orphan_reaper() -> None:
    """Start (once per process) the watcher that cleans up after a killed driver (see above)."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    _reaper = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
