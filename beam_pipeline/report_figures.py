"""Figures of the run report, rendered with Matplotlib's object API (Agg canvas, no pyplot state) to PNG
bytes, so they can be written anywhere through FileSystems and embedded in the HTML."""
from __future__ import annotations

import io as _io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from beam_pipeline import sources
from siamese_core import decode

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


def gallery_png(rows: Sequence[dict], *, max_members: int = 6, thumb: int = THUMB_PIXELS,
                empty: str = "no duplicate clusters at this threshold") -> bytes:
    """A grid, one row per cluster: its keeper then members, each captioned with its score.

    rows: [{"title": str, "members": [{"item_id", "source_uri", "caption"}], "more": int (not shown),
    "keeper": bool (default True: the first member is framed as the keeper)}].
    Without rows, a figure saying there are none (`empty`).
    """
    if not rows:
        fig = Figure(figsize=(6, 1.2))
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=12)
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
            if c == 0 and row.get("keeper", True):
                for spine in ax.spines.values():
                    spine.set_edgecolor("#31a354")
                    spine.set_linewidth(2.5)
            if c == 0:
                more = f" ({len(row['members'])} shown, {row['more']} more)" if row.get("more") else ""
                ax.set_title(row["title"] + more, fontsize=8, loc="left")
    return _png(fig)


def all_pairs_histogram_png(dist: dict, threshold: float, *, score: str, threshold_label: str = "") -> bytes:
    """Histogram of every pair's score (report.json's all_pairs: impostors and, with labels, planted
    duplicates), log counts so the few pairs near the threshold stay visible beside the bulk."""
    edges = np.asarray(dist["bin_edges"], np.float64)
    lefts, widths = edges[:-1], np.diff(edges)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    impostor = np.asarray(dist["impostor_counts"], np.float64)
    label = "other pairs" if dist.get("genuine_counts") is not None else "pairs"
    ax.bar(lefts, impostor, width=widths, align="edge", color="#bbbbbb", label=label)
    if dist.get("genuine_counts") is not None:
        ax.bar(lefts, np.asarray(dist["genuine_counts"], np.float64), width=widths, align="edge",
               color="#2b8cbe", alpha=0.85, label="planted duplicates")
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(float(impostor.max(initial=1)), 1.0) * 60)  # headroom: the legend sits above the bars
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"threshold {threshold:.4f}" + (f" ({threshold_label})" if threshold_label else ""))
    ax.set_xlabel(score)
    ax.set_ylabel("pairs (log)")
    ax.set_title(dist["of"], fontsize=9)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    return _png(fig)


def sweep_png(sweep: Sequence[dict], threshold: float, *, score: str, threshold_label: str = "") -> bytes:
    """What each threshold would give (report_metrics.threshold_sweep): pairs, expected false pairs,
    clusters and items to drop against the threshold, log counts, the run's threshold marked."""
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    t = np.asarray([r["threshold"] for r in sweep], np.float64)
    for key, label, style in (("pairs", "pairs at or above", "-"), ("expected_false_pairs", "expected false pairs", "--"),
                              ("clusters", "clusters", "-."), ("items_to_drop", "items to drop", ":")):
        y = np.asarray([np.nan if r.get(key) is None else r[key] for r in sweep], np.float64)
        if np.isfinite(y).any():
            ax.plot(t, np.where(y > 0, y, np.nan), style, marker=".", label=label)
    ax.set_yscale("log")
    ax.axvline(threshold, color="black", linewidth=1,
               label=f"run threshold {threshold:.4f}" + (f" ({threshold_label})" if threshold_label else ""))
    ax.set_xlabel(score)
    ax.set_ylabel("count (log)")
    ax.set_title("what each threshold would give", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    return _png(fig)


def error_curves_png(curves: dict, threshold: float) -> dict[str, bytes]:
    """ROC (TMR against FMR, log FMR), DET (FNMR against FMR, both log) and precision/recall from
    report.json's curves; the run's threshold marked on each. {"roc", "det", "precision_recall"}: PNG."""
    pts = curves["points"]
    t = np.asarray([p["threshold"] for p in pts])
    fmr = np.asarray([p["fmr"] for p in pts])
    tmr = np.asarray([p["tmr"] for p in pts])
    prec = np.asarray([np.nan if p["precision"] is None else p["precision"] for p in pts])
    at = int(np.argmin(np.abs(t - threshold))) if len(t) else None
    floor = 0.5 / max(curves["impostor_pairs"], 1)  # FMR 0 drawn half a pair below the smallest rate

    def figure(title, xlabel, ylabel):
        fig = Figure(figsize=(4.6, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        return fig, ax

    out = {}
    fig, ax = figure(f"ROC (AUC {curves['auc']:.4f})", "false match rate (log)", "true match rate")
    ax.plot(np.maximum(fmr, floor), tmr, color="#2b8cbe")
    ax.set_xscale("log")
    if at is not None:
        ax.plot(max(fmr[at], floor), tmr[at], "o", color="black", label=f"run threshold {threshold:.4f}")
        ax.legend(loc="lower right", fontsize=7)
    out["roc"] = _png(fig)
    fig, ax = figure(f"DET (EER {curves['eer']['rate']:.4f})", "false match rate (log)",
                     "false non-match rate (log)")
    fnmr_floor = 0.5 / max(curves["genuine_pairs"], 1)
    ax.plot(np.maximum(fmr, floor), np.maximum(1 - tmr, fnmr_floor), color="#e34a33")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if at is not None:
        ax.plot(max(fmr[at], floor), max(1 - tmr[at], fnmr_floor), "o", color="black",
                label=f"run threshold {threshold:.4f}")
        ax.legend(loc="upper right", fontsize=7)
    out["det"] = _png(fig)
    fig, ax = figure("precision / recall (precision over the whole catalogue)", "recall", "precision")
    ax.plot(tmr, prec, color="#31a354")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    if at is not None:
        ax.plot(tmr[at], prec[at], "o", color="black", label=f"run threshold {threshold:.4f}")
        ax.legend(loc="lower left", fontsize=7)
    out["precision_recall"] = _png(fig)
    return out
