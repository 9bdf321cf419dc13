"""``t2i submit / logs / stop``: a run as a Ray job on a remote cluster (see pipeline/run/submit.py).

Its commands join the main app in pipeline/cli/__init__.py.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.cli.common import console, err_console
from pipeline.cli.common import fail as _fail

app = typer.Typer()  # its commands join the main app in pipeline/cli/__init__.py

ADDRESS_HELP = ("Ray dashboard (Jobs API) address, e.g. http://127.0.0.1:8265 after `ray dashboard cluster/aws.yaml`; "
                "default: the one recorded in the run's _JOB.json, then $RAY_API_SERVER_ADDRESS.")


@app.command()
def submit(spec: str = typer.Argument(..., help="Run spec YAML (validated here before anything is submitted)."),
           address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
           set_: List[str] = typer.Option([], "--set", help="Override a spec field: section.field=value (repeatable)."),
           pip: bool = typer.Option(False, "--pip/--no-pip",
                                    help="Install pyproject's dependencies in the job's runtime env "
                                         "(--no-pip, the default: the cluster image already has them)."),
           check: bool = typer.Option(True, "--check/--no-check",
                                      help="Before the run's job exists, run a short probe job in the same runtime env "
                                           "to check that the cluster's python has this package's dependencies at "
                                           "this client's versions (with --pip the probe does the install: minutes)."),
           check_timeout: float = typer.Option(600.0, "--check-timeout", help="Seconds to wait for the probe job."),
           ) -> None:
    """Submit a run to a Ray cluster as a Ray job; prints the job id (also kept in <run>/_JOB.json).

    When the dashboard wants a token (Ray >= 2.59 clusters), t2i takes it from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order, whatever RAY_AUTH_MODE says."""
    from pipeline.run.spec import SpecError, parse_override  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.submit import SubmitError, submit_run  # speed: as above

    try:
        overrides = dict(parse_override(o) for o in set_)
        rec = submit_run(spec, address, overrides, pip=pip, check=check, check_timeout_s=check_timeout,
                         log=lambda m: console.print(m, soft_wrap=True))
    except (SpecError, SubmitError) as e:
        _fail(str(e))
    console.print(f"submitted run {rec.run_uri} as job [bold]{rec.submission_id}[/] to {rec.address}")
    console.print(f"  follow:  t2i logs {rec.submission_id} --address {rec.address} --follow")
    console.print(f"  status:  t2i status {rec.run_uri}")
    console.print(f"  stop:    t2i stop {rec.submission_id} --address {rec.address}")
    print(rec.submission_id)  # last line, plain: scripts read it


@app.command()
def logs(job_or_run: str = typer.Argument(..., help="Job id (t2i-…) or a submitted run (URI or id)."),
         address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    """The job driver's output (the same lines `t2i run` prints locally)."""
    from pipeline.run.submit import SubmitError, job_logs  # speed: not for t2i --help (yaml, spec)

    try:
        job_logs(job_or_run, address, follow=follow, log=lambda m: err_console.print(m))
    except SubmitError as e:
        _fail(str(e))


@app.command()
def stop(job_or_run: str = typer.Argument(..., help="Job id (t2i-…) or a submitted run (URI or id)."),
         address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
         wait: float = typer.Option(30.0, help="Seconds to wait for the job to reach a final state.")) -> None:
    """Stop a submitted run's job. Finished stages stay done; `t2i submit` again resumes the run."""
    from pipeline.run.submit import SubmitError, stop_job  # speed: not for t2i --help (yaml, spec)

    try:
        sid, status = stop_job(job_or_run, address, wait_s=wait, log=lambda m: err_console.print(m))
    except SubmitError as e:
        _fail(str(e))
    console.print(f"job {sid}: {status}")
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        _fail(f"job {sid} did not stop within {wait:.0f}s (still {status})", code=1)
