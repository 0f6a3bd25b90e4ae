"""Progress output: live bars on a terminal, a few plain lines (each once) in a log."""

from __future__ import annotations

import io

from pipeline.output import progress
from pipeline.output.progress import LineBar, bar_kind, progress_bar, worker_runtime_env


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_terminal_gets_one_line_per_shown_update_and_few_of_them(monkeypatch):
    # set here, not in a fixture: pytest's capture replaces sys.stdout and sys.stderr after set-up
    log_stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", log_stdout)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: lines, on stdout
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    bar = progress_bar(1000, "sft")
    assert isinstance(bar, LineBar)
    for step in range(1000):
        bar.update(1)
        if step % 10 == 0:
            bar.set_description(f"sft loss {1 / (step + 1):.3f}")
    bar.close()
    text = log_stdout.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 1 <= len(lines) <= 11, lines  # a line per tenth of the total, no more
    assert len(set(lines)) == len(lines), lines  # no update printed twice
    assert lines[-1].startswith("sft loss 0.001: 1000/1000 (100%)"), lines[-1]


def test_line_bar_bounds_lines_by_tenths_and_time():
    clock, stream = _Clock(), io.StringIO()
    bar = LineBar(10_000, "reward model", stream=stream, every_s=60.0, clock=clock)
    for _ in range(10_000):
        clock.now += 0.1  # 1000 s in all: at most one line per 60 s besides the tenths
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 10 + 1000 // 60 + 1, lines
    assert len(set(lines)) == len(lines)
    # slow updates: a line at most every 60 s even when each step is its own tenth or less
    clock2, stream2 = _Clock(), io.StringIO()
    slow = LineBar(0, "generate", stream=stream2, clock=clock2)  # unknown total: time alone
    for _ in range(100):
        clock2.now += 5.0
        slow.update(1)
    slow.close()
    assert len(stream2.getvalue().splitlines()) <= 500 // 60 + 1


def test_close_prints_the_end_once_and_empty_bars_once():
    stream = io.StringIO()
    bar = LineBar(4, "rs: sample and score", stream=stream, clock=_Clock())
    bar.update(4)  # crosses into the last tenth: the end is already shown
    bar.close()
    assert stream.getvalue().splitlines() == ["rs: sample and score: 4/4 (100%) in 0 s"]
    empty = io.StringIO()
    LineBar(0, "nothing", stream=empty, clock=_Clock()).close()
    assert empty.getvalue().splitlines() == ["nothing: 0 in 0 s"]


def test_terminal_keeps_live_bars_and_passes_the_choice_to_actors(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert bar_kind() == "bars"
    assert worker_runtime_env() == {"env_vars": {progress.PROGRESS_ENV: "bars"}}
    bar = progress_bar(3, "pretrain")
    assert not isinstance(bar, LineBar)  # tqdm
    bar.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert bar_kind() == "lines" and worker_runtime_env() is None  # actors print lines without being told
    monkeypatch.setenv(progress.PROGRESS_ENV, "lines")
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert bar_kind() == "lines"  # chosen by hand
