"""Figures of the run report, rendered with Matplotlib's object API (Agg canvas, no pyplot state) to PNG
bytes, so they can be written anywhere through FileSystems and embedded in the HTML."""
from __future__ import annotations

import io as _io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from beam_pipeline import decode, sources

THUMB_PIXELS = 96


def _png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def similarity_histogram_png(histogram: dict, threshold: float, *, genuine_counts: Sequence[int] | None = None,
                             threshold_label: str = "", score: str = "angular similarity") -> bytes:
    """Bar chart of `histogram` (report.json's similarity_histogram) with the threshold marked; `score`
    names the x axis (what the threshold cut).

    With `genuine_counts` (per bin, from ground truth) the bars are split into planted duplicates and
    other matched pairs.
    """
    edges = np.asarray(histogram["bin_edges"], np.float64)
    counts = np.asarray(histogram["counts"], np.int64)
    widths, lefts = np.diff(edges), edges[:-1]
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    if genuine_counts is not None:
        genuine = np.asarray(genuine_counts, np.int64)
        ax.bar(lefts, genuine, width=widths, align="edge", color="#2b8cbe", edgecolor="white",
               label="planted duplicates")
        ax.bar(lefts, counts - genuine, width=widths, bottom=genuine, align="edge", color="#e34a33",
               edgecolor="white", label="other matched pairs")
    else:
        ax.bar(lefts, counts, width=widths, align="edge", color="#2b8cbe", edgecolor="white",
               label="matched pairs")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"threshold {threshold:.4f}" + (f" ({threshold_label})" if threshold_label else ""))
    ax.set_xlabel(score)
    ax.set_ylabel("pairs")
    ax.set_title(f"{histogram['of']}: {int(counts.sum())}")
    ax.set_xlim(edges[0] - 0.02 * (edges[-1] - edges[0]), edges[-1])
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def read_thumbnail(uri: str, size: int = THUMB_PIXELS, max_pixels: int = decode.DEFAULT_MAX_PIXELS,
                   max_bytes: int = sources.DEFAULT_MAX_FILE_BYTES) -> np.ndarray | None:
    """The image at `uri` (local or gs://) as an RGB uint8 array fitting `size` x `size`; None if it
    cannot be read or decoded, or breaks the embed stage's limits: more than `max_bytes` bytes, more than
    `max_pixels` pixels, a format outside decode.ACCEPTED_FORMATS (the file may have changed since it
    was embedded)."""
    from PIL import Image

    record = sources.read_file(uri, uri, max_bytes)
    if isinstance(record, sources.ReadFailure):
        return None
    try:
        with decode.open_image(record.data, max_pixels, (size, size)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size), Image.Resampling.NEAREST if max(img.size) < size else Image.Resampling.LANCZOS)
            if max(img.size) < size:  # small images (28x28) are scaled up, pixel-sharp
                scale = size / max(img.size)
                img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                                 Image.Resampling.NEAREST)
            return np.asarray(img)
    except Exception:  # any unreadable file becomes a placeholder in the gallery, never a failed report
        return None


def gallery_png(rows: Sequence[dict], *, max_members: int = 6, thumb: int = THUMB_PIXELS) -> bytes:
    """A grid, one row per cluster: its keeper then members, each captioned with its score.

    rows: [{"title": str, "members": [{"item_id", "source_uri", "caption"}], "more": int (not shown)}].
    Without rows, a figure saying there are no duplicate clusters.
    """
    if not rows:
        fig = Figure(figsize=(6, 1.2))
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no duplicate clusters at this threshold", ha="center", va="center", fontsize=12)
        return _png(fig)
    cols = max(1, min(max_members, max(len(r["members"]) for r in rows)))
    fig = Figure(figsize=(1.55 * cols, 1.95 * len(rows)))
    grid = fig.add_gridspec(len(rows), cols, hspace=0.75, wspace=0.15)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row["members"]):
                ax.axis("off")
                continue
            member = row["members"][c]
            image = read_thumbnail(member["source_uri"], thumb)
            if image is None:
                ax.imshow(np.full((thumb, thumb, 3), 200, np.uint8))
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xlabel(member["caption"], fontsize=7)
            if c == 0:
                for spine in ax.spines.values():
                    spine.set_edgecolor("#31a354")
                    spine.set_linewidth(2.5)
                more = f" ({len(row['members'])} shown, {row['more']} more)" if row.get("more") else ""
                ax.set_title(row["title"] + more, fontsize=8, loc="left")
    return _png(fig)
