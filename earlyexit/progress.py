"""Progress of the long commands that do not train (``analyze``, ``eval``, ``score``): one callback, one bar.

The library reports progress through an optional callback ``progress(done, total, label)``: ``done`` of
``total`` steps of the part named ``label`` are finished (e.g. ``(3, 40, "test batches")``). ``tracked``
wraps an iterable so that it reports each item it hands out. The command line passes ``TerminalProgress``,
which draws one ``click.progressbar`` per label on stderr, and only when stderr is a terminal
(``terminal_progress`` returns None otherwise: output piped to a file or read by a test carries no bar).
Training reports its own progress through ``train``'s log hook.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

import click

ProgressFn = Callable[[int, int, str], None]  # progress(done, total, label)
T = TypeVar("T")


def tracked(items: Iterable[T], total: int, label: str, progress: ProgressFn | None) -> Iterator[T]:
    """``items``, reporting ``progress(i, total, label)`` after the ``i``-th (nothing to report without a callback)."""
    if progress is None:
        yield from items
        return
    progress(0, total, label)
    for i, item in enumerate(items, 1):
        yield item
        progress(min(i, total), total, label)


class TerminalProgress:
    """A ``progress(done, total, label)`` callback drawn as a ``click.progressbar`` on ``stream``.

    A new label (or total) finishes the previous bar and starts another; a bar that reaches its total ends.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar, self.key, self.done = None, None, 0

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.bar is None or self.key != (label, total):
            self.close()
            self.bar = click.progressbar(length=max(total, 1), label=label, file=self.stream, show_pos=True)
            self.bar.__enter__()
            self.key, self.done = (label, total), 0
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        """Finish the bar being drawn (its line stays; the next output starts on a new line)."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar, self.key = None, None


def terminal_progress(stream: TextIO | None = None) -> TerminalProgress | None:
    """``TerminalProgress`` on ``stream`` (default stderr) when it is a terminal, else None (no bar at all)."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return TerminalProgress(stream) if isatty is not None and isatty() else None


__all__ = ["ProgressFn", "tracked", "TerminalProgress", "terminal_progress"]
