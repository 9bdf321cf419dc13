"""What the Ray-job modules share (pipeline/run/submit.py, submit_check.py): the user-facing error
types and the job states that end a job. Its own module so that the preflight check can use them
without importing the submission module that calls it."""
from __future__ import annotations

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A submission-side problem with a message meant for the user as is."""


class AuthError(SubmitError):
    """The dashboard wants a token and t2i has none it accepts (one line: where t2i looked, what to do)."""
