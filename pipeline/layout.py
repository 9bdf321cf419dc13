"""Where every artifact of a run lives in the store: one module, so no path is rebuilt by hand.

A run is a folder ``<store>/<run_id>/`` holding ``spec.yaml`` and one folder per stage. A stage
folder holds *attempts*, never outputs directly (docs/design.md, "Attempts")::

    <run>/<stage>/<attempt>/...            one attempt's outputs; <attempt> = fingerprint[:12]
    <run>/<stage>/<attempt>/_MANIFEST.json  written last: the attempt is complete iff it exists
    <run>/<stage>/<fp12>-2/...              an explicit ``t2i rerun`` of the same config
    <run>/<stage>/_CURRENT.json             which attempt the last finished run used

A stage whose definition changes (its fingerprint) starts a new attempt *beside* the old one,
so nothing trained is ever deleted implicitly; going back to an old config finds its attempt
again. ``t2i gc`` is the only thing that removes attempts.

Inside a run, a stage folder and an attempt, the names below are the only spelling of each
path: a module that needs one imports it from here (this module imports pipeline.store only, so
every floor may). These are on-disk names: renaming one makes every existing run unreadable, so
they never change.
"""
from __future__ import annotations

import re

from pipeline import store

# The run folder <run>/.
SPEC = "spec.yaml"                # the runner: the validated spec of the last `t2i run`
JOB = "_JOB.json"                 # t2i submit: which Ray job runs this run (pipeline/run/submit.py)
REPORT = "report.html"            # sample: the run's report (also <run>/report.html, refreshed by `t2i report`)
EVAL_CLI = "eval_cli"             # t2i eval: eval_cli/{final,step_N}/ and eval_cli/checkpoints/ (outside the graph)
SAMPLES_CLI = "samples_cli"       # t2i sample: images sampled outside the graph

# The stage folder <run>/<stage>/.
CURRENT = "_CURRENT.json"         # the runner: {"attempt": name} of the attempt last finished
ATTEMPT_PREFIX_LEN = 12
_ATTEMPT = re.compile(r"^([0-9a-f]{12})(?:-(\d+))?$")

# Bookkeeping inside every attempt.
LEASE = "_LEASE.json"             # the driver working on the attempt: owner and heartbeat (pipeline/run/lease.py)
STARTED = "_STARTED.json"         # the runner: the attempt's fingerprint, written when it starts (pipeline/manifest.py)
MANIFEST = "_MANIFEST.json"       # the runner, last: the attempt is done iff it exists (pipeline/manifest.py)
ERROR = "_ERROR.json"             # the runner: why the attempt's last try failed (pipeline/run/stage_exec.py)
PROGRESS = "_PROGRESS.json"       # the stage's own process: live figures and status lines (pipeline/progress.py)
TRAIN_PROGRESS = "_PROGRESS.train.json"  # rank 0 of a training loop (maybe another process than the stage's)

# Artifact names inside an attempt.
SHARDS = "shards"                 # download: NNNNN.tar (+ stats, parquet); embed: NNNNN.npz + NNNNN.done.json
ENCODERS = "encoders.json"        # embed: which encoders made the embeddings (data_prep/encoders_doc.py)
FINAL = "final"                   # training: final/step_NNNNNNNN/{model.safetensors, config.json}
FINAL_WEIGHTS = "model.safetensors"  # training: the consolidated EMA weights (stages/training/final_weights.py)
FINAL_CONFIG = "config.json"      # training, after the weights: what they are (final_weights.FinalConfig)
CHECKPOINTS = "checkpoints"       # training: checkpoints/step_NNNNNNNN/... (stages/training/checkpoint.py)
METRICS = "metrics.jsonl"         # training: one JSON row per logged step
TENSORBOARD = "tb"                # training: TensorBoard event files
TRAIN_SAMPLES = "samples"         # training: samples/<name>_NNNNNNNN.png, the live weights' sample grids
LOOP_RESULT = "loop_result.json"  # training, rank 0 at the end: what the loop did (read back by the driver)
EVAL_LOG = "eval.jsonl"           # t2i eval --checkpoints, in a training attempt: one row per checkpoint
GRID = "grid.png"                 # sample: every sample in one image (beside report.html and the PNGs)
SAMPLE_INDEX = "samples.json"     # sample: every image with its prompt, cascade and seed (t2i sample --from-sample)
EVALUATION = "evaluation.json"    # evaluate: per-prompt figures beside the manifest
EVAL_WEIGHTS = "weights"          # t2i eval at checkpoints: weights/<stage>/.../final/step_N/, a checkpoint as a final

# Inside a checkpoint folder checkpoints/step_NNNNNNNN/ (stages/training/checkpoint.py), each
# written by every rank (or rank 0) before rank 0 writes COMPLETE last.
CHECKPOINT_DEEPSPEED = "ds"       # DeepSpeed's own files (its checkpoint tag)
CHECKPOINT_COMPLETE = "COMPLETE"  # rank 0, last: the checkpoint is whole iff it exists
CHECKPOINT_DAMAGED = "DAMAGED.json"  # rank 0, when a restore found a file that differs from COMPLETE's list
CHECKPOINT_EMA = "ema.safetensors"  # rank 0: the EMA (ZeRO 0-2: the same on every rank)

# Inside shards/: one set of files per shard id NNNNN.
SHARD_TAR = ".tar"                # download (img2dataset): the webdataset shard
SHARD_STATS = "_stats.json"       # download (img2dataset): per-shard stats, written when the shard finished
SHARD_PARQUET = ".parquet"        # download (img2dataset): one row per URL with its status
EMBED_NPZ = ".npz"                # embed: the shard's embeddings (data_prep/embed_format.py)
EMBED_DONE = ".done.json"         # embed, after the .npz: the shard's done marker (data_prep/embed/ledger.py)
EMBED_PARTS = "_parts"            # embed: _parts/NNNNN/CCCCC.npz, one encoded chunk before the shard is joined

# The download attempt's URL lists (data_prep/download/retry.py): what a resume fetches again.
URL_LIST = "url_list"             # url_list/pass<N>/*.parquet: each pass's normalised URL list
DOWNLOAD_STATE = URL_LIST + "/state.json"  # the passes so far and the list's counts

_STEP = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """``step_NNNNNNNN``: a checkpoint's or a final's folder name (fixed width: names sort by step)."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a ``step_N`` folder name or URI (any width, a trailing slash allowed), else None."""
    m = _STEP.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def train_sample_name(name: str, step: int) -> str:
    """``samples/<name>_NNNNNNNN.png``: one sample grid of a training attempt (the report parses it)."""
    return f"{name}_{step:08d}.png"


def checkpoint_dir(attempt: str, step: int) -> str:
    return store.join(attempt, CHECKPOINTS, step_name(step))


def checkpoint_state(rank: int) -> str:
    """A rank's JSON state in a checkpoint: step, data position, python RNG, world size."""
    return f"state_rank{rank}.json"


def checkpoint_rng(rank: int) -> str:
    """A rank's torch RNG states in a checkpoint."""
    return f"rng_rank{rank}.safetensors"


def checkpoint_uploaded(rank: int) -> str:
    """Written by a rank once all its files of a checkpoint are in the store: their sizes and
    SHA-256 sums, which rank 0 merges into COMPLETE (background uploads need no collective)."""
    return f"uploaded_rank{rank}.json"


def checkpoint_ema(rank: int, sharded: bool) -> str:
    """The EMA file a rank writes and reads: the one EMA, or its own partition under ZeRO-3."""
    return f"ema_rank{rank}.safetensors" if sharded else CHECKPOINT_EMA


def url_list_pass(attempt: str, n: int) -> str:
    return store.join(attempt, URL_LIST, f"pass{n}")


def shard_file(shards_uri: str, shard: str, suffix: str) -> str:
    """``<shards>/<shard><suffix>``: e.g. ``shard_file(s, "00000", EMBED_NPZ)`` -> ``.../00000.npz``."""
    return store.join(shards_uri, shard + suffix)


def run_spec_uri(run_uri: str) -> str:
    return store.join(run_uri, SPEC)


def stage_root(run_uri: str, stage: str) -> str:
    return store.join(run_uri, stage)


def attempt_name(fingerprint: str, number: int = 1) -> str:
    """``fp[:12]`` for the first attempt of a config, ``fp[:12]-N`` for the N-th (``t2i rerun``)."""
    base = fingerprint[:ATTEMPT_PREFIX_LEN]
    return base if number <= 1 else f"{base}-{number}"


def parse_attempt(name: str) -> tuple[str, int] | None:
    """(fingerprint prefix, number) of an attempt folder name, or None for anything else."""
    m = _ATTEMPT.match(name.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        return None
    return m.group(1), int(m.group(2) or 1)


def attempt_uri(run_uri: str, stage: str, name: str) -> str:
    return store.join(run_uri, stage, name)


def list_attempts(run_uri: str, stage: str) -> list[tuple[str, str]]:
    """[(attempt name, uri)] of every attempt folder of a stage, in name order."""
    out = []
    for uri in store.listdir(stage_root(run_uri, stage)):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if parse_attempt(name) is not None:
            out.append((name, store.join(run_uri, stage, name)))
    return sorted(out)


def attempts_of(run_uri: str, stage: str, fingerprint: str) -> list[tuple[int, str]]:
    """[(number, uri)] of the attempts made for this fingerprint, lowest number first."""
    prefix = fingerprint[:ATTEMPT_PREFIX_LEN]
    found = []
    for name, uri in list_attempts(run_uri, stage):
        parsed = parse_attempt(name)
        if parsed and parsed[0] == prefix:
            found.append((parsed[1], uri))
    return sorted(found)


def current_attempt_uri(run_uri: str, stage: str, fingerprint: str) -> str:
    """The attempt a run with this fingerprint uses: the newest one made for it, else the first."""
    found = attempts_of(run_uri, stage, fingerprint)
    if found:
        return found[-1][1]
    return attempt_uri(run_uri, stage, attempt_name(fingerprint))


def next_attempt_uri(run_uri: str, stage: str, fingerprint: str) -> str:
    """A fresh attempt for this fingerprint (``t2i rerun``): the old ones stay until ``t2i gc``."""
    found = attempts_of(run_uri, stage, fingerprint)
    number = found[-1][0] + 1 if found else 1
    return attempt_uri(run_uri, stage, attempt_name(fingerprint, number))


def write_current(run_uri: str, stage: str, attempt: str) -> None:
    """Point tools that have no spec at hand (``t2i sample``, ``t2i export``) at a finished attempt."""
    name = attempt.rstrip("/").rsplit("/", 1)[-1]
    store.write_json(store.join(stage_root(run_uri, stage), CURRENT), {"attempt": name})


def read_current(run_uri: str, stage: str) -> str | None:
    """URI of the attempt the last finished run of this stage used, or None."""
    uri = store.join(stage_root(run_uri, stage), CURRENT)
    if not store.exists(uri):
        return None
    try:
        name = store.read_json(uri).get("attempt")
    except (ValueError, store.StoreError, AttributeError):
        return None
    return attempt_uri(run_uri, stage, name) if name and parse_attempt(name) else None


def finished_stage_dir(run_uri: str, stage: str) -> str | None:
    """The folder holding a stage's finished outputs for tools without a spec: the attempt
    ``_CURRENT.json`` names, else ``<run>/<stage>`` itself when it holds outputs directly (a run
    laid out by hand or by an older release), else None."""
    uri = read_current(run_uri, stage)
    if uri is not None:
        return uri
    flat = stage_root(run_uri, stage)
    if any(store.exists(store.join(flat, name)) for name in (FINAL, ENCODERS, SHARDS)):
        return flat
    return None


def final_dir(attempt: str, step: int) -> str:
    """Final weights of a training attempt at ``step``: each extension writes a new folder, so
    the weights an earlier finished run wrote are never overwritten."""
    return store.join(attempt, FINAL, step_name(step))
