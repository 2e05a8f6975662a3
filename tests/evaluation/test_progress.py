"""Progress where the output is not a terminal: a line every few seconds at most, never a bar."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from mvtcae.evaluation import progress as progress_module
from mvtcae.evaluation.progress import progress, throttled


class Clock:
    """A clock that advances ``step`` seconds at every reading."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_one_line_per_interval_at_most_and_none_for_a_short_loop():
    lines: list[str] = []
    # 100 items, 0.5 s each: 50 s in all, so at most one line per 10 s, 5 lines.
    items = list(
        throttled(
            range(100), "nll given fac+pix", every_s=10.0, clock=Clock(0.5), emit=lines.append
        )
    )
    assert items == list(range(100))
    assert 4 <= len(lines) <= 5, lines
    assert lines[0] == "nll given fac+pix: 20/100 (20%)", lines
    quick: list[str] = []
    assert list(throttled(range(50), "quick", every_s=10.0, clock=Clock(0.01), emit=quick.append))
    assert quick == []  # a loop shorter than the interval prints nothing
    unsized: list[str] = []
    list(throttled(iter(range(30)), "stream", every_s=1.0, clock=Clock(0.5), emit=unsized.append))
    assert unsized and unsized[0] == "stream: 2", unsized


def test_no_bar_is_drawn_where_the_output_is_not_a_terminal(monkeypatch, caplog):
    stderr = io.StringIO()  # not a terminal, like a Ray worker's or `ray job submit`'s output
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 10.0)
    with caplog.at_level(logging.INFO, logger="mvtcae.evaluation.progress"):
        assert list(progress(range(1000), "latent probe")) == list(range(1000))
    assert stderr.getvalue() == ""  # no tqdm redraws
    assert caplog.records == []  # finished within the interval: no line at all


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_gets_one_updating_bar(monkeypatch, terminal):
    stream = io.StringIO()
    stream.isatty = lambda: terminal  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", stream)
    list(progress(range(3), "coherence"))
    assert ("coherence" in stream.getvalue()) is terminal
