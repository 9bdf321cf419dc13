"""The Ray dashboard's token, found the way users hold it, sent only as an HTTP header.

Why this exists: Ray >= 2.59 turns token authentication on for clusters started with
``ray start --head`` (which keeps the token in ``~/.ray/auth_token`` on the head), Ray 2.61 for
all clusters, and KubeRay (``authOptions``) keeps it in a Kubernetes secret. Ray's own
``JobSubmissionClient`` sends the token only when ``RAY_AUTH_MODE=token`` is set in the caller's
shell, which a user who just ran ``ray start --head`` does not have -- so ``t2i submit`` (and
``ray job submit``) were refused with a paragraph of Ray's text.

So t2i's job commands (submit, logs, stop, status) ask the dashboard first whether it wants a
token (``/api/authentication_mode`` is public), and when it does, look for it where Ray does and
in Ray's order -- ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH`` names, then
``~/.ray/auth_token`` -- whatever ``RAY_AUTH_MODE`` says, check it once against the dashboard
(``/api/version``, which also gives the cluster's Ray version) and hand back the header.

The token is a credential for the whole cluster: it goes into the ``Authorization`` header of
requests to the dashboard and nowhere else -- never into a runtime env, ``_JOB.json``, the run
folder, a message or a log. Messages name where it came from, never what it is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

LOOKED_IN = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token"
HOW_TO_GET = ("get it with `ray get-auth-token` on the head, or from the KubeRay secret (authOptions), "
              "and put it in ~/.ray/auth_token (or point RAY_AUTH_TOKEN_PATH at it)")
TIMEOUT_S = 10.0


class TokenError(RuntimeError):
    """No usable token for a dashboard that wants one; the message is one line for the user."""


@dataclass
class Dashboard:
    """What t2i knows about a dashboard after :func:`open_dashboard`. ``headers`` may hold the
    token: it is left out of ``repr`` so that printing this object never shows it."""

    address: str
    ray_version: str | None = None
    token_source: str | None = None          # e.g. "~/.ray/auth_token (/home/u/.ray/auth_token)"
    headers: dict = field(default_factory=dict, repr=False)


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(token, where it came from)`` in Ray's order, or None when there is none.

    A set ``RAY_AUTH_TOKEN_PATH`` whose file is missing or empty is an error, as in Ray (falling
    through to ``~/.ray/auth_token`` would silently send another cluster's token).
    """
    env = os.environ if environ is None else environ
    token = (env.get("RAY_AUTH_TOKEN") or "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror or e}); "
                             f"point it at the file that holds the cluster's token, or unset it") from None
        if not token:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {HOW_TO_GET}")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = default_token_path()
    try:
        token = default.read_text().strip()
    except OSError:
        return None
    return (token, f"~/.ray/auth_token ({default})") if token else None


def _get(url: str, headers: dict | None = None, verify=True):
    import requests  # a dependency of ray[default]; loaded only by the job commands

    return requests.get(url, headers=headers or {}, timeout=TIMEOUT_S, verify=verify)


def auth_mode(address: str, verify=True) -> str | None:
    """The dashboard's ``authentication_mode`` ("token", "disabled"); None when it does not say
    (an older Ray has no such endpoint). Connection errors propagate."""
    r = _get(f"{address}/api/authentication_mode", verify=verify)
    if r.status_code != 200:
        return None
    try:
        return str(r.json().get("authentication_mode") or "") or None
    except ValueError:
        return None


def missing_token_message(address: str) -> str:
    return f"the dashboard at {address} requires a token; looked in {LOOKED_IN}: none there; {HOW_TO_GET}"


def open_dashboard(address: str, *, log: Callable[[str], None] | None = None, verify=True) -> Dashboard:
    """Find out whether ``address`` (a dashboard URL, userinfo already stripped for messages)
    wants a token, and if so which one to send; checks it once. Returns the dashboard with its
    Ray version and the headers every later request must carry.

    Raises TokenError (one line) for a missing or refused token; connection errors propagate
    (the caller says "cannot reach").
    """
    mode = auth_mode(address, verify=verify)
    dash = Dashboard(address=address)
    if mode != "token":
        r = _get(f"{address}/api/version", verify=verify)
        if r.status_code not in (401, 403):  # no token wanted (or a dashboard that does not say)
            dash.ray_version = _ray_version(r)
            return dash
    found = find_token()
    if found is None:
        raise TokenError(missing_token_message(address))
    token, source = found
    headers = {"Authorization": f"Bearer {token}"}
    r = _get(f"{address}/api/version", headers, verify=verify)
    if r.status_code in (401, 403):
        raise TokenError(f"the dashboard at {address} refused the token from {source} "
                         f"(HTTP {r.status_code}: a token of another cluster, or an old one); "
                         f"looked in {LOOKED_IN}; {HOW_TO_GET}")
    dash.ray_version, dash.token_source, dash.headers = _ray_version(r), source, headers
    if log:
        log(f"token: the dashboard at {address} requires one; using the token from {source}")
    return dash


def _ray_version(r) -> str | None:
    if r.status_code != 200:
        return None
    try:
        return r.json().get("ray_version")
    except ValueError:
        return None


__all__ = ["Dashboard", "HOW_TO_GET", "LOOKED_IN", "TokenError", "auth_mode", "find_token",
           "missing_token_message", "open_dashboard"]
