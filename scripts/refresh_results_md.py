"""Rewrite every generated block of RESULTS.md from the committed results/ (what tests/test_results_md.py checks).

Blocks:
- ``<!-- summary: GLOB [GLOB ...] -->`` ... ``<!-- /summary -->``: ``summary --markdown`` of the run folders;
- ``<!-- pair: GLOB_A [GLOB_A ...] | GLOB_B [...] | a>b or a<b -->`` ... ``<!-- /pair -->``: the paired
  intervals and verdicts of ``summary --pair`` (``earlyexit.pairs.markdown_pair``);
- ``<!-- cosine: GLOB_A [...] | GLOB_B [...] | a>b or a<b -->`` ... ``<!-- /cosine -->``: the paired intervals of
  each exit's mean gradient cosine (``earlyexit.pairs.markdown_cosine_pair``, Figure 4).

Run from the repository root: ``python scripts/refresh_results_md.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from earlyexit.pairs import cosine_pair, markdown_cosine_pair, markdown_pair, pair_summary  # noqa: E402
from earlyexit.reports import markdown_summary, summarize_runs  # noqa: E402

SUMMARY = re.compile(r"(<!-- summary: (.+?) -->\n)(.*?)(<!-- /summary -->)", re.S)
PAIR = re.compile(r"(<!-- pair: (.+?) -->\n)(.*?)(<!-- /pair -->)", re.S)
COSINE = re.compile(r"(<!-- cosine: (.+?) -->\n)(.*?)(<!-- /cosine -->)", re.S)


def dirs_of(globs: str) -> list[Path]:
    return sorted({p for g in globs.split() for p in ROOT.glob(g) if (p / "results.json").is_file()})


def pair_block(spec: str) -> str:
    a, b, claim = (part.strip() for part in spec.split("|"))
    return markdown_pair(pair_summary(dirs_of(a), dirs_of(b), direction=1 if claim == "a>b" else -1))


def cosine_block(spec: str) -> str:
    a, b, claim = (part.strip() for part in spec.split("|"))
    return markdown_cosine_pair(cosine_pair(dirs_of(a), dirs_of(b), direction=1 if claim == "a>b" else -1))


def main() -> None:
    f = ROOT / "RESULTS.md"
    text = f.read_text()
    text = SUMMARY.sub(lambda m: m.group(1) + markdown_summary(summarize_runs(dirs_of(m.group(2)))) + m.group(4), text)
    text = PAIR.sub(lambda m: m.group(1) + pair_block(m.group(2)) + m.group(4), text)
    text = COSINE.sub(lambda m: m.group(1) + cosine_block(m.group(2)) + m.group(4), text)
    f.write_text(text)


if __name__ == "__main__":
    main()
