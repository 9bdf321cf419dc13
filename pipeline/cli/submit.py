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
def submit(target: str = typer.Argument(..., metavar="SPEC|RUN",
                                        help="A run spec YAML (validated here before anything is submitted), or an "
                                             "existing run (URI or id, as `t2i resume` takes it) to resume or rerun "
                                             "as a job."),
           address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
           set_: List[str] = typer.Option([], "--set", help="Override a spec field: section.field=value (repeatable). "
                                                             "For a RUN: changes its saved spec.yaml (e.g. a higher "
                                                             "train_base.steps extends the finished attempt)."),
           stage: Optional[str] = typer.Option(None, help="RUN only: resume just this stage (finish it, or extend it "
                                                          "to the spec's steps), as `t2i resume RUN --stage S`."),
           from_: Optional[str] = typer.Option(None, "--from", help="RUN only: this stage and everything downstream, "
                                                                    "as `t2i resume RUN --from S`."),
           rerun: bool = typer.Option(False, "--rerun", help="RUN only: start --stage/--from afresh as new attempts, "
                                                             "as `t2i rerun`."),
           pip: bool = typer.Option(False, "--pip/--no-pip",
                                    help="Install pyproject's dependencies in the job's runtime env "
                                         "(--no-pip, the default: the cluster image already has them)."),
           pip_installer: str = typer.Option("auto", "--pip-installer",
                                             help="With --pip: uv (Ray's uv runtime env: fast), pip, or auto (uv "
                                                  "where this Ray has it, else pip). Pins: the Makefile's."),
           check: bool = typer.Option(True, "--check/--no-check",
                                      help="Before the run's job exists, run a short probe job in the same runtime env "
                                           "to check that the cluster's python has this package's dependencies at "
                                           "this client's versions (with --pip the probe does the install: minutes)."),
           check_timeout: float = typer.Option(600.0, "--check-timeout", help="Seconds to wait for the probe job."),
           ) -> None:
    """Submit a run to a Ray cluster as a Ray job; prints the job id (also kept in <run>/_JOB.json).

    `t2i submit SPEC` runs `t2i run SPEC` on the cluster; `t2i submit RUN [--stage S | --from S] [--rerun]`
    runs `t2i resume` (or `t2i rerun`) on an existing run, which must live where the cluster reads it
    (s3:// or gs://; file:// only when the nodes share this filesystem). A run whose latest job is
    still pending or running is refused.

    When the dashboard wants a token (Ray >= 2.59 clusters), t2i takes it from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order, whatever RAY_AUTH_MODE says."""
    from pipeline.run.spec import SpecError, parse_override  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.submit import SubmitError, resolve_target, submit_existing_run, submit_run  # speed: as above

    log = lambda m: console.print(m, soft_wrap=True)  # noqa: E731
    try:
        overrides = dict(parse_override(o) for o in set_)
        if pip_installer not in ("auto", "uv", "pip"):
            _fail(f"--pip-installer must be auto, uv or pip, not {pip_installer!r}")
        pip = pip_installer if pip else False  # the installer travels as submit's pip (pipeline/run/runtime_env.py)
        kind, where = resolve_target(target)
        if kind == "spec":
            if stage or from_ or rerun:
                _fail(f"--stage/--from/--rerun take an existing run, not a spec file: t2i submit RUN --stage S "
                      f"(RUN: the run's URI or id; {target} is a spec)")
            rec = submit_run(where, address, overrides, pip=pip, check=check, check_timeout_s=check_timeout, log=log)
        else:
            rec = submit_existing_run(where, address, overrides, stage=stage, from_stage=from_, rerun=rerun, pip=pip,
                                      check=check, check_timeout_s=check_timeout, log=log)
    except (SpecError, SubmitError) as e:
        _fail(str(e))
    what = f"run {rec.run_uri}" if rec.verb == "run" else f"`t2i {rec.verb} {' '.join(rec.args)}`"
    console.print(f"submitted {what} as job [bold]{rec.submission_id}[/] to {rec.address}", soft_wrap=True)
    console.print(f"  follow:  t2i logs {rec.submission_id} --address {rec.address} --follow", soft_wrap=True)
    console.print(f"  status:  t2i status {rec.run_uri}", soft_wrap=True)
    console.print(f"  stop:    t2i stop {rec.submission_id} --address {rec.address}", soft_wrap=True)
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
