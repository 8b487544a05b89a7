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


def plot_ratios(
    labels: list[str], walls: list[float], cpus: list[float], pairs: list[list[float]],
    title: str, path: Path,
) -> None:
    """Bars of the median wall and CPU ratio per row, with the pairwise wall ratios as dots
    (the benches whose ratios are the other tool's time over vdisk's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 3.5))
    xs = list(range(len(labels)))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], walls, w, color="#4c72b0", label="wall")
    ax.bar([x + w / 2 for x in xs], cpus, w, color="#55a868", label="CPU seconds")
    for x, pts in zip(xs, pairs, strict=True):
        ax.scatter([x - w / 2] * len(pts), pts, color="black", s=8, zorder=3)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels)
    ax.set_ylabel("qemu-img / vdisk")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
