"""Progress bars of the long commands: drawn on a terminal, absent otherwise, never changing a result."""

from __future__ import annotations

import io

from earlyexit.progress import TerminalProgress, terminal_progress, tracked


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tracked_reports_each_item_and_hands_them_on_unchanged():
    seen = []
    assert list(tracked(iter("abc"), 3, "letters", lambda *a: seen.append(a))) == ["a", "b", "c"]
    assert seen == [(0, 3, "letters"), (1, 3, "letters"), (2, 3, "letters"), (3, 3, "letters")]
    assert list(tracked("abc", 3, "letters", None)) == ["a", "b", "c"]


def test_a_bar_only_on_a_terminal():
    assert terminal_progress(io.StringIO()) is None  # piped, redirected or captured: no bar
    term = _Terminal()
    bar = terminal_progress(term)
    assert isinstance(bar, TerminalProgress)
    for i in range(4):
        bar(i, 3, "test batches")
    bar(0, 2, "validation batches")
    bar(2, 2, "validation batches")
    text = term.getvalue()
    assert "test batches" in text and "3/3" in text and "validation batches" in text and "2/2" in text
    assert bar.bar is None  # every bar finished
