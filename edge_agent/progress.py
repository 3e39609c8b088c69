"""Progress on stderr for the command line, with rich (typer's own dependency: the one progress
library of the project). Shown only when stderr is a terminal and the command was not asked
for ``--json``: scripts, pipes and tests see none of it.

``activity``: one line with a spinner whose text follows the phases of a command (loading a
model, finding peers), and a byte bar when ``on_bytes(done, total)`` is fed (weights fetched
from a peer); ``file_growth``: the same bar for a writer that reports nothing (``model split``).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """``--json`` commands call this first: their stderr stays free of progress."""
    global _QUIET
    _QUIET = quiet


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty()


class Activity:
    """One live line (rich allows one live display at a time: a command has one of these)."""

    def __init__(self, description: str) -> None:
        self._bar = None
        if not enabled():
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task(description, total=None, amount="")
        self._bar.start()

    def describe(self, description: str) -> None:
        """A new phase of unknown length."""
        if self._bar is not None:
            self._bar.update(self._task, description=description, total=None, completed=0, amount="")

    def on_bytes(self, done: int, total: int) -> None:
        """A byte count (any thread: rich locks)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, amount=f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def activity(description: str) -> Iterator[Activity]:
    act = Activity(description)
    try:
        yield act
    finally:
        act.stop()


@contextmanager
def file_growth(pattern: Path, expected_bytes: int, description: str) -> Iterator[None]:
    """A byte bar over the files matching ``pattern`` (a glob in one folder) while the body
    writes them; ``expected_bytes`` may be an estimate (the bar waits at 99 % until the end)."""
    if not enabled():
        yield
        return
    done = threading.Event()

    def poll(act: Activity) -> None:
        while not done.wait(0.2):
            try:
                written = sum(p.stat().st_size for p in pattern.parent.glob(pattern.name))
            except OSError:  # renamed while we looked: the writer finished
                continue
            act.on_bytes(min(written, int(expected_bytes * 0.99)), expected_bytes)

    with activity(description) as act:
        watcher = threading.Thread(target=poll, args=(act,), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
