"""The one way the benches rewrite their section of ``docs/performance.md``."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def replace_section(heading: str, body: str, docs: Path = DOCS) -> None:
    """Put ``heading`` and ``body`` in place of the section under ``heading`` (up to the next
    ``## `` heading), or append them when the section is new."""
    text = docs.read_text()
    section = f"{heading}\n\n{body}\n"
    start = text.find(heading)
    if start < 0:
        docs.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    nxt = text.find("\n## ", start + len(heading))
    end = len(text) if nxt < 0 else nxt + 1
    docs.write_text(text[:start] + section + text[end:])
