"""Helpers shared by the tests of the command line's fault handling (test_failures, test_safety)."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from earlyexit.cli import main

QUICK = ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--device", "cpu"]


def invoke(args, **kw):
    return CliRunner().invoke(main, args, **kw)


def one_line_error(r, pattern, code=2, *, after_progress=False, prefix=""):
    """Exit ``code``, no traceback, and the error in one line (starting with ``prefix``): the only output
    (``after_progress``: after training's progress lines)."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exc_info)
    assert isinstance(r.exception, SystemExit), r.exc_info
    lines = r.output.strip().splitlines()
    assert lines and lines[-1].startswith(prefix) and pattern in lines[-1], r.output
    if after_progress:
        assert all(ln.startswith(("phase ", "  phase ")) for ln in lines[:-1]), r.output
    else:
        assert len(lines) == 1, r.output


def files_of(d: Path) -> dict[str, bytes]:
    """Every file in a folder (hidden ones included) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def finished_run(tmp_path_factory, name: str) -> Path:
    """A finished one-epoch run of the tiny MLP."""
    out = tmp_path_factory.mktemp(name) / "run"
    r = invoke(["run", *QUICK, "--epochs", "1", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def copy_run(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(src, out)
    return out
