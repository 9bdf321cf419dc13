"""The driver's console: stage messages (from the store) printed once each, live figures on
one line per running stage, and plain lines when the output is not a terminal."""
from __future__ import annotations

from pipeline import store
from pipeline.run.console import ProgressConsole
from pipeline.progress import TRAIN_PROGRESS, StageProgress, describe, format_duration


def test_messages_once_and_live_figures(tmp_path):
    attempt = store.normalize(str(tmp_path / "run" / "train_base" / "abc"))
    printed: list[str] = []
    console = ProgressConsole(printed.append, poll_s=0.05, plain_every_s=0.0)
    stage = StageProgress(attempt, every_s=0.0)
    train = StageProgress(attempt, every_s=0.0, name=TRAIN_PROGRESS)
    with console:
        console.started("train_base", attempt)
        stage.message("training demo for 10 steps")
        train.update(step=3, total=10, loss=0.25, samples_per_s=12.5, eta_s=70, last_checkpoint=2)
        console.poll_once()
        console.poll_once()  # a second look prints nothing new
        stage.message("resumed from checkpoint step 2")
        console.poll_once()
        console.finished("train_base")
    msgs = [p for p in printed if "·" in p]
    assert msgs == ["  train_base · training demo for 10 steps", "  train_base · resumed from checkpoint step 2"]
    live = [p for p in printed if p.startswith("▶ train_base")]
    assert live and "step 3/10" in live[0] and "loss 0.2500" in live[0] and "ETA 1m10s" in live[0]
    assert "ckpt 2" in live[0]


def test_describe_and_durations():
    assert describe({"done": 3, "total": 8, "unit": "shards", "rows_per_s": 100.0}) == "3/8 shards, 100.0 rows/s"
    assert format_duration(5) == "5s" and format_duration(3725) == "1h02m"


def test_progress_numbering_survives_a_restart(tmp_path):
    attempt = str(tmp_path / "a")
    p = StageProgress(attempt, every_s=0.0)
    p.message("one")
    p.message("two")
    again = StageProgress(attempt, every_s=0.0)  # a resumed stage continues the numbering
    again.message("three")
    assert [seq for seq, _ in again.messages] == [3]
