"""The run report: report.json, report.html and figures from a work directory of embed/match/dedup outputs.

    siamese-dedup report --workdir D [--model_dir MODEL] [--ground_truth planted.csv] [--gallery_size 8]

Reads D/templates, D/failures, D/matches, D/clusters (validated, via beam_pipeline.io) and
D/match_run.json. Writes
- D/report.json (schemas.validate_report): model_id, run_id, the threshold and where it came from,
  counts, the histogram of matched pairs' similarities, failures by stage, the evaluation against planted
  duplicates when --ground_truth is given (beam_pipeline.report_metrics), output paths;
- D/figures/similarity_hist.png and D/figures/duplicates_gallery.png (the largest and the weakest-linked
  clusters, thumbnails read from each item's source_uri, scored against the keeper);
- D/report.html: self-contained (figures inlined as base64 PNG).
The report is driver-side Python: everything it reads is already aggregated by the pipelines.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import io as bio
from beam_pipeline import clustering, match_stats, outputs, report_figures, report_metrics, score_distribution
from beam_pipeline.options import new_run_id
from siamese_core.artefact import load_model_card
from schemas.documents import validate_match_run, validate_report
from schemas.tables import FAILURE_STAGES, FAILURES_SCHEMA, SchemaError, embeddings_as_numpy
from siamese_core.similarity import pair_angular_similarity

LOG = logging.getLogger(__name__)
HISTOGRAM_BINS = 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siamese-dedup report",
        description="Write report.json, report.html and figures for a work directory of embed/match/dedup outputs.",
    )
    parser.add_argument("--workdir", required=True, help="Directory holding templates/, failures/, matches/, "
                        "clusters/ and match_run.json (local or gs://).")
    parser.add_argument("--model_dir", default=None, help="Encoder artefact directory: its model card's metrics "
                        "are shown.")
    parser.add_argument("--ground_truth", default=None, help="CSV with columns left_id,right_id of planted "
                        "duplicate pairs: adds precision/recall and an FMR/FNMR sweep.")
    parser.add_argument("--manifest", default=None, help="CSV with columns item_id,edit (a catalogue's "
                        "manifest.csv): scores per edit family beside the overall ones.")
    parser.add_argument("--linkage", default=None, help="The linkage dedup used (clustering.LINKAGES), for the "
                        "threshold sweep's re-clustering. Default: dedup's default.")
    parser.add_argument("--gallery_size", type=int, default=8, help="Clusters shown in the gallery: half the "
                        "largest, half the weakest-linked (default 8).")
    parser.add_argument("--gallery_members", type=int, default=6, help="Thumbnails per gallery row (default 6).")
    parser.add_argument("--target_fmr", type=float, action="append", default=[],
                        help="With --ground_truth: also state the threshold at this false match rate (repeatable; "
                        "1e-2 ... 1e-6 are always stated).")
    return parser


def _write_bytes(path: str, data: bytes, mime: str) -> str:
    with FileSystems.create(path, mime_type=mime) as f:
        f.write(data)
    return path


def failures_by_stage(failures: pa.Table) -> dict:
    """Count of failures per stage, every known stage listed (zeros included)."""
    stages = failures.column("stage").to_pylist()
    return {stage: stages.count(stage) for stage in FAILURE_STAGES}


def cluster_summaries(clusters: pa.Table) -> list[dict]:
    """Clusters of size >= 2: [{"cluster_id", "size", "min_link_similarity", "members" (keeper first, then
    by id)}], largest first (ties: weaker link first, then cluster_id)."""
    big = clusters.filter(pc.greater(clusters.column("cluster_size"), 1))
    groups: dict[str, dict] = {}
    for item, cid, keeper, size, link, diameter, chained in zip(
        big.column("item_id").to_pylist(), big.column("cluster_id").to_pylist(),
        big.column("is_keeper").to_pylist(), big.column("cluster_size").to_pylist(),
        big.column("min_link_similarity").to_pylist(), big.column("min_member_similarity").to_pylist(),
        big.column("is_chained").to_pylist(),
    ):
        g = groups.setdefault(cid, {"cluster_id": cid, "size": int(size), "min_link_similarity": link,
                                    "min_member_similarity": diameter, "is_chained": bool(chained),
                                    "keeper": None, "others": []})
        if keeper:
            g["keeper"] = item
        else:
            g["others"].append(item)
    out = []
    for g in groups.values():
        out.append({"cluster_id": g["cluster_id"], "size": g["size"], "min_link_similarity": g["min_link_similarity"],
                    "min_member_similarity": g["min_member_similarity"], "is_chained": g["is_chained"],
                    "members": [g["keeper"], *sorted(g["others"])]})
    return sorted(out, key=lambda c: (-c["size"], c["min_link_similarity"], c["cluster_id"]))


def matching_summary(run_doc: dict) -> dict:
    """How the pairs were found (match_run.json): mode, exact or approximate, the work done, and for
    approximate search its recall measured against exact search on a sample."""
    keys = ("mode", "search", "block_size", "kernel_threads", "products", "partitions", "max_assign",
            "capped_items", "recall", "stage_seconds", "pipeline_seconds", "seconds")
    out = {k: run_doc.get(k) for k in keys}
    out["mode"] = out["mode"] or "all_pairs"
    out["search"] = out["search"] or "exact"
    return out


MAX_CHAINED_SHOWN = 24  # chained clusters are all shown, up to this many (the table lists them all)


def gallery_selection(summaries: list[dict], gallery_size: int) -> list[tuple[str, dict]]:
    """Half the largest clusters, every chained cluster (up to MAX_CHAINED_SHOWN, largest first), then the
    weakest-linked ones not already chosen up to `gallery_size`: [(why, cluster)]."""
    if gallery_size == 0:
        return []
    chosen, seen = [], set()
    largest = (gallery_size + 1) // 2
    for c in summaries[:largest]:
        chosen.append(("largest, chained" if c.get("is_chained") else "largest", c))
        seen.add(c["cluster_id"])
    for c in [c for c in summaries if c.get("is_chained") and c["cluster_id"] not in seen][:MAX_CHAINED_SHOWN]:
        chosen.append(("chained", c))
        seen.add(c["cluster_id"])
    for c in sorted(summaries, key=lambda c: (c["min_link_similarity"], c["cluster_id"])):
        if len(chosen) >= gallery_size:
            break
        if c["cluster_id"] not in seen:
            chosen.append(("weakest link", c))
            seen.add(c["cluster_id"])
    return chosen


def gallery_rows(selection, templates: pa.Table, max_members: int) -> list[dict]:
    """Rows for report_figures.gallery_png: keeper first, members by similarity to the keeper."""
    index = {item: k for k, item in enumerate(templates.column("item_id").to_pylist())}
    uris = templates.column("source_uri").to_pylist()
    emb = embeddings_as_numpy(templates)
    rows = []
    for why, c in selection:
        keeper, others = c["members"][0], c["members"][1:]
        k = index[keeper]
        idx = np.asarray([index[o] for o in others], np.int64)
        sims = pair_angular_similarity(np.repeat(emb[k:k + 1], len(idx), axis=0), emb[idx]) if len(idx) else []
        ranked = sorted(zip(others, np.asarray(sims).tolist()), key=lambda t: (-t[1], t[0]))
        members = [{"item_id": keeper, "source_uri": uris[k], "caption": f"keeper\n{_short(keeper)}"}]
        for other, s in ranked[: max_members - 1]:
            members.append({"item_id": other, "source_uri": uris[index[other]], "caption": f"{s:.4f}\n{_short(other)}"})
        rows.append({
            "title": f"{why}: {c['size']} items, weakest link {c['min_link_similarity']:.4f}",
            "members": members,
            "more": max(0, len(others) - (max_members - 1)),
        })
    return rows


NEAR_PAIRS = 12          # pairs shown just above and just below the threshold
NEAR_PAIRS_PER_ROW = 3


def _near_pairs(i, j, score, item_ids, uris, groups) -> list[dict]:
    return [{"left_id": item_ids[a], "right_id": item_ids[b], "score": float(v), "left_uri": uris[a],
             "right_uri": uris[b], "planted": None if groups is None else bool(groups[a] == groups[b])}
            for a, b, v in zip(i, j, score)]


def threshold_choice(run_doc: dict, threshold: dict, templates: pa.Table, matches: pa.Table, sim: np.ndarray,
                     groups: np.ndarray | None, linkage: str, score_name: str, notes: list[str],
                     weakest: list | None = None, target_fmrs=score_distribution.TARGET_FMRS
                     ) -> tuple[dict | None, dict]:
    """The numbers and figures a person chooses a threshold by (beam_pipeline.score_distribution): the
    scores of all pairs of the catalogue, what each threshold would give, the error curves when the truth's
    `groups` (per template, in templates order) are known, and the pairs just above (`weakest`: [(score,
    left_id, right_id)] from match_stats; else from `sim`) and just below it.
    Returns ({"all_pairs", "threshold_sweep", "curves", "near_threshold"} or None, {figure: png})."""
    if (run_doc.get("mode") or "all_pairs") != "all_pairs":
        notes.append(f"a {run_doc.get('mode')} run compares two sets: the all-pairs distribution, sweep and error "
                     "curves describe one catalogue's pairs and are left out")
        return None, {}
    value = float(threshold["value"])
    emb = embeddings_as_numpy(templates)
    if len(emb) < 2:
        return None, {}
    dist = score_distribution.run_score_distribution(emb, threshold, groups=groups)
    all_pairs = dist.to_json()
    item_ids = templates.column("item_id").to_pylist()
    uris = templates.column("source_uri").to_pylist()
    index = {x: n for n, x in enumerate(item_ids)}
    mi = np.fromiter((index[x] for x in matches.column("left_id").to_pylist()), np.int64, matches.num_rows)
    mj = np.fromiter((index[x] for x in matches.column("right_id").to_pylist()), np.int64, matches.num_rows)

    curves = None
    if groups is not None and dist.genuine is not None and dist.genuine.sum():
        curves = score_distribution.curves(dist, target_fmrs)
        impostors_above = np.append(dist.at_or_above(dist.impostor), 0)

        def expected_false(grid):
            at = np.clip(np.searchsorted(dist.edges, grid, side="left"), 0, len(impostors_above) - 1)
            return impostors_above[at] * dist.scale
    else:
        expected_false = _self_calibration_curve(threshold.get("self_calibration"))
    top = float(sim.max()) if len(sim) else value
    low = max(float(dist.edges[0]), value - max(top - value, 0.05))
    sweep = report_metrics.threshold_sweep(
        value, len(item_ids), mi, mj, sim, linkage=linkage,
        predicted=lambda grid: score_distribution.predicted_pairs(dist, grid),
        expected_false=expected_false, low=low, high=max(top, value))

    if weakest is None:
        order = np.argsort(sim, kind="stable")[:NEAR_PAIRS]
        weakest = [(float(sim[k]), item_ids[mi[k]], item_ids[mj[k]]) for k in order]
    weakest = weakest[:NEAR_PAIRS]  # the lowest-scoring matches (match_stats)
    below = dist.borderline[:NEAR_PAIRS]
    near = {
        "above": _near_pairs([index[a] for _, a, _ in weakest], [index[b] for _, _, b in weakest],
                             [v for v, _, _ in weakest], item_ids, uris, groups),
        "below": _near_pairs([x[0] for x in below], [x[1] for x in below], [x[2] for x in below], item_ids, uris,
                             groups),
        "below_of": "every pair of the catalogue" if dist.exhaustive else
                    f"the pairs of a random subset of {dist.items_scored} items",
    }
    label = threshold.get("source", "")
    figures = {
        "all_pairs_hist": report_figures.all_pairs_histogram_png(all_pairs, value, score=score_name,
                                                                 threshold_label=label),
        "threshold_sweep": report_figures.sweep_png(sweep, value, score=score_name, threshold_label=label),
    }
    if curves:
        figures.update(report_figures.error_curves_png(curves, value))
    return {"all_pairs": all_pairs, "threshold_sweep": sweep, "curves": curves, "near_threshold": near}, figures


def _self_calibration_curve(cal: dict | None):
    """Expected false pairs at any threshold inside the self-calibration's curve (linear in log), else None."""
    points = (cal or {}).get("curve") or []
    if len(points) < 2:
        return None
    t = np.asarray([p["threshold"] for p in points], np.float64)
    fp = np.log(np.maximum([p["expected_false_pairs"] for p in points], 1e-12))

    def expected_false(grid):
        grid = np.asarray(grid, np.float64)
        out = np.exp(np.interp(grid, t, fp))
        return np.where((grid >= t.min()) & (grid <= t.max()), out, np.nan)
    return lambda grid: [None if np.isnan(v) else float(v) for v in expected_false(grid)]


def near_threshold_rows(near: dict, per_row: int) -> list[dict]:
    """Gallery rows of the pairs just above and just below the threshold, `per_row` pairs to a row."""
    rows = []
    for side, title in (("above", "just above the threshold (weakest matches)"),
                        ("below", "just below the threshold (strongest non-matches)")):
        pairs = near[side]
        for start in range(0, len(pairs), per_row):
            members = []
            for n, p in enumerate(pairs[start:start + per_row], start + 1):
                mark = "" if p["planted"] is None else (" planted" if p["planted"] else " not planted")
                members += [{"item_id": p["left_id"], "source_uri": p["left_uri"],
                             "caption": f"#{n} {p['score']:.4f}{mark}\n{_short(p['left_id'])}"},
                            {"item_id": p["right_id"], "source_uri": p["right_uri"],
                             "caption": f"#{n}\n{_short(p['right_id'])}"}]
            rows.append({"title": title if start == 0 else "", "members": members, "keeper": False})
    return rows


def _short(item_id: str, width: int = 18) -> str:
    return item_id if len(item_id) <= width else "…" + item_id[-(width - 1):]


def _read_optional_failures(workdir: str, notes: list[str]) -> pa.Table:
    try:
        return bio.read_table_dir(workdir, "failures")
    except FileNotFoundError:
        notes.append("no failures table found under the work directory: failures counted as 0")
        return FAILURES_SCHEMA.empty_table()


def check_lineage(workdir: str, run_doc: dict) -> dict:
    """Refuse a work directory whose tables do not belong together (beam_pipeline.outputs): matches not
    made from these templates, clusters not made from these matches, a match_run.json of another run.
    Returns {"templates": fingerprint, "match_run_id", "dedup_run_id"} for report.json."""
    templates = outputs.templates_fingerprint(bio.table_glob(workdir, "templates"))
    matches_glob, clusters_glob = bio.table_glob(workdir, "matches"), bio.table_glob(workdir, "clusters")
    matches = outputs.single_run(matches_glob, "matches", "match")
    outputs.check_matches(matches, templates, matches_glob, bio.table_glob(workdir, "templates"))
    clusters = outputs.single_run(clusters_glob, "clusters", "dedup")
    outputs.check_clusters(clusters, matches, templates, clusters_glob)
    if run_doc.get("run_id") != matches["run_id"]:
        raise outputs.LineageError(f"{FileSystems.join(workdir, 'match_run.json')} describes match run "
                                   f"{run_doc.get('run_id')}, the matches are of run {matches['run_id']}")
    return {"templates": templates, "match_run_id": matches["run_id"], "dedup_run_id": clusters["run_id"]}


def build_report(workdir: str, *, model_dir: str | None = None, ground_truth: str | None = None,
                 gallery_size: int = 8, gallery_members: int = 6, manifest: str | None = None,
                 linkage: str | None = None, target_fmrs=score_distribution.TARGET_FMRS) -> tuple[dict, dict]:
    """Compute the report document and its figures -> (report dict (not yet with outputs), {name: png})."""
    notes: list[str] = []
    run_path = FileSystems.join(workdir, "match_run.json")
    run_doc = validate_match_run(bio.read_json(run_path), run_path)
    lineage = check_lineage(workdir, run_doc)
    templates = bio.read_table_dir(workdir, "templates")
    failures = _read_optional_failures(workdir, notes)
    matches = bio.read_table_dir(workdir, "matches")
    clusters = bio.read_table_dir(workdir, "clusters")

    model_ids = set(templates.column("model_id").to_pylist())
    model_id = run_doc.get("model_id") or (next(iter(model_ids)) if len(model_ids) == 1 else "")
    if model_ids and model_ids != {model_id}:
        raise ValueError(f"templates of model(s) {sorted(model_ids)} but match_run.json names model {model_id}")
    if templates.num_rows != run_doc.get("items"):
        notes.append(f"match_run.json counted {run_doc.get('items')} items but the templates hold "
                     f"{templates.num_rows}: the templates changed after matching")
    if matches.num_rows != run_doc.get("pairs"):
        notes.append(f"match_run.json counted {run_doc.get('pairs')} pairs but the matches hold {matches.num_rows}")
    if set(clusters.column("item_id").to_pylist()) != set(templates.column("item_id").to_pylist()):
        notes.append("the clusters table does not cover exactly the template items: rerun dedup")
    card = None
    if model_dir:
        card = load_model_card(model_dir)
        if model_id and card["model_id"] != model_id:
            raise ValueError(f"--model_dir holds model {card['model_id']}, the run used model {model_id}")

    threshold = dict(run_doc["threshold"])
    # The matches' score is what the threshold cut: the angular similarity, or the kNN-normalised score.
    sim = matches.column("score").to_numpy().astype(np.float32)
    score_name = threshold.get("score", "angular_similarity").replace("_", " ")
    planted, truth_groups = None, None
    if ground_truth:
        planted = report_metrics.read_ground_truth(bio.read_text(ground_truth))
        # The truth's group of every template, in the templates' order.
        truth_groups = report_metrics.GroundTruth(templates.column("item_id").to_pylist(), planted).labels
    # The matched pairs' histogram and weakest pairs: a Beam combiner over the matches in bounded memory.
    stats = match_stats.compute(
        bio.table_glob(workdir, "matches"), score=threshold.get("score", "angular_similarity"),
        groups=None if truth_groups is None else dict(zip(templates.column("item_id").to_pylist(),
                                                          truth_groups.tolist())))
    # Angular similarities run up to 1; kNN-normalised scores stay well below it.
    top = 1.0 if score_name == "angular similarity" or not stats["pairs"] else float(stats["high"])
    histogram = match_stats.display_histogram(stats, threshold["value"], top, HISTOGRAM_BINS,
                                              f"matched pairs ({score_name})")
    genuine_counts = histogram.pop("genuine_counts")
    if ground_truth:
        histogram["genuine_counts"] = genuine_counts
    else:
        genuine_counts = None
    sizes = clusters.column("cluster_size").to_numpy()
    keepers = clusters.column("is_keeper").to_numpy(zero_copy_only=False)
    counts = {
        "items": int(templates.num_rows),
        "failures": int(failures.num_rows),
        "pairs": int(stats["pairs"]),
        "clusters": int(((sizes > 1) & keepers).sum()),
        "items_to_drop": int((~keepers).sum()),
        "chained_clusters": int((clusters.column("is_chained").to_numpy(zero_copy_only=False) & keepers
                                 & (sizes > 1)).sum()),
    }
    evaluation = None
    if ground_truth:
        families = report_metrics.read_families(bio.read_text(manifest)) if manifest else None
        evaluation = report_metrics.evaluate(
            clusters.column("item_id").to_pylist(), clusters.column("cluster_id").to_pylist(),
            matches.column("left_id").to_pylist(), matches.column("right_id").to_pylist(), sim, planted,
            threshold["value"], families=families,
            sweep_linkage=linkage or clustering.DEFAULT_LINKAGE,
            sweep_high=top,
        )
        evaluation["ground_truth"] = ground_truth
        evaluation["score"] = score_name

    choosing, choosing_figures = threshold_choice(run_doc, threshold, templates, matches, sim, truth_groups,
                                                  linkage or clustering.DEFAULT_LINKAGE, score_name, notes,
                                                  weakest=stats["weakest"], target_fmrs=target_fmrs)
    summaries = cluster_summaries(clusters)
    selection = gallery_selection(summaries, gallery_size)
    figures = {
        "similarity_hist": report_figures.similarity_histogram_png(
            histogram, threshold["value"], genuine_counts=genuine_counts, score=score_name,
            threshold_label=threshold.get("source", "")),
        "duplicates_gallery": report_figures.gallery_png(
            gallery_rows(selection, templates, gallery_members), max_members=gallery_members),
        **choosing_figures,
    }
    if choosing:
        figures["near_threshold"] = report_figures.gallery_png(
            near_threshold_rows(choosing["near_threshold"], per_row=NEAR_PAIRS_PER_ROW), max_members=2 * NEAR_PAIRS_PER_ROW,
            empty="no pairs near the threshold")
    report = {
        "model_id": model_id,
        "run_id": run_doc.get("run_id", ""),
        "threshold": {k: threshold.get(k) for k in ("value", "score", "knn", "score_norm", "angular_similarity",
                                                     "cosine", "source", "target_fmr",
                                                     "impostor_pairs", "self_calibration", "review") if k in threshold},
        "counts": counts,
        "similarity_histogram": histogram,
        "failures_by_stage": failures_by_stage(failures),
        "evaluation": evaluation,
        "largest_clusters": [{**c, "members": c["members"][:20]} for c in summaries[:20]],
        "model_card": None if card is None else {
            "model_id": card["model_id"], "embedding_dim": card["embedding_dim"], "metrics": card.get("metrics", {}),
            "thresholds": card.get("thresholds", {}),
        },
        "matching": matching_summary(run_doc),
        **(choosing or {}),
        "lineage": lineage,
        "notes": notes,
    }
    return report, figures


# ----------------------------------------------------------------------------------------------- HTML

def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    # Wrapped so a wide table scrolls inside itself on a phone instead of widening the page.
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) < 1e-3 and v != 0) else f"{v:.4f}"
    return str(v)


def _flat_metrics(metrics: dict, prefix: str = "") -> list[list]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            rows += _flat_metrics(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append([f"{prefix}{k}", v])
    return rows


def _matching_html(m: dict) -> str:
    if not m:
        return ""
    how = (f"<p>Mode <code>{html.escape(str(m.get('mode')))}</code>, search "
           f"<code>{html.escape(str(m.get('search')))}</code>")
    if m.get("products") is not None:
        how += f", {m['products']:,} similarities computed"
    how += ".</p>"
    r = m.get("recall")
    if m.get("search") == "approximate":
        if r and r.get("recall") is not None:
            how += (f"<p><b>Approximate search recall: {r['recall']:.4f}</b> ({r['found']} of {r['pairs']} "
                    f"above-threshold pairs of {r['sample_items']} randomly sampled items, found against exact "
                    f"search; one-sided 95% lower bound {r['recall_lower_95']:.4f}). {m.get('partitions')} k-means "
                    f"partitions, up to {m.get('max_assign')} per item; {m.get('capped_items')} items had more "
                    "partitions within the exactness margin than that cap.</p>")
        else:
            how += "<p class='note'>Approximate search: the recall sample held no above-threshold pair.</p>"
    return "<h2>Matching</h2>" + how


def _review_html(review: dict | None) -> str:
    """A threshold recalibrated on a person's labels (siamese-dedup review import), with what it rests on."""
    if not review:
        return ""
    prev = review["previous"]
    text = (f"<p>Recalibrated on a person's labels: {review['labelled_pairs']} pairs near the previous threshold "
            f"{prev['value']:.6f} (<code>{html.escape(str(prev['source']))}</code>) were judged, "
            f"{review['duplicates']} duplicates and {review['distinct']} distinct; at this threshold "
            f"{review['errors']} of them disagree with their label. Rule: {html.escape(review['rule'])}.")
    if review.get("precision_labelled_95"):
        lo, hi = review["precision_labelled_95"]
        text += (f" Labelled pairs at or above it are duplicates {review['precision_labelled']:.1%} of the time "
                 f"(95% {lo:.1%} to {hi:.1%}).")
    return text + f" Labels: <code>{html.escape(str(review['labels']))}</code>.</p>"


def _self_calibration_html(cal: dict | None) -> str:
    """How a self-calibrated threshold was chosen, in a person's words, with the figures behind it."""
    if not cal:
        return ""
    lo, hi = cal["expected_false_pairs_ci95"]
    recall = cal.get("expected_copy_recall") or {}
    tail = cal["tail_model"]
    text = (f"<p>Chosen for this catalogue (self-calibration): {html.escape(cal['budget'])}. Of its "
            f"{cal['catalogue_pairs']:,} pairs, about {cal['predicted_pairs']:,.0f} are at or above the threshold; "
            f"expected false pairs among them: <b>{cal['expected_false_pairs']:.2f}</b> (95% interval "
            f"{lo:.2f} to {hi:.2f}), from {cal['impostor_pairs_sampled']:,} sampled pairs of the catalogue and a "
            f"{html.escape(tail['family'])} tail fitted between {tail['u']:.4f} and {tail['c']:.4f}.")
    if recall:
        lo_r, hi_r = recall["ci95"]
        text += (f" Synthetic copies of {recall['synthetic_copies']} catalogue items reach it "
                 f"{recall['estimate']:.1%} of the time (95% {lo_r:.1%} to {hi_r:.1%}).")
    text += "</p>"
    for note in cal.get("notes") or []:
        text += f"<p class='note'>Note: {html.escape(note)}</p>"
    by_family = (cal.get("synthetic_copies") or {}).get("recall_by_family") or {}
    if by_family:
        text += _table(["synthetic copy edit", "share at or above the threshold"], sorted(by_family.items()))
    return text


def _choosing_html(report: dict, img: dict) -> str:
    """Choosing the threshold: all pairs, the sweep, the error curves (with labels), the pairs near it."""
    if not report.get("all_pairs"):
        return ""
    a, t = report["all_pairs"], report["threshold"]
    scored = (f"all {a['items']:,} items' pairs" if a["exhaustive"] else
              f"the pairs of a random subset of {a['items_scored']:,} of the {a['items']:,} items (counts scale by "
              f"{a['scale']:.1f} to the whole catalogue)")
    parts = ["<h2>Choosing the threshold</h2>",
             f"<p>Every pair's score, from {scored}; the matches hold only the pairs at or above the threshold.</p>",
             f"<img alt='histogram of all pairs' src='{img['all_pairs_hist']}'>",
             "<h3>What each threshold would give</h3>",
             "<p>Pairs at or above each threshold (estimated from the scores above), the expected false pairs "
             "among them (" + ("from the planted duplicates" if report.get("curves") else
                               "from the self-calibration, where it has an estimate") + "), and at or above the "
             "run's threshold the clusters and items to drop that dedup would give (re-clustered from the "
             "matches with the run's linkage; below it the matches do not hold the pairs). The knee, where pairs "
             "start to grow faster than duplicates can, is where a threshold belongs.</p>",
             f"<img alt='threshold sweep' src='{img['threshold_sweep']}'>",
             _table([t.get("score", "score").replace("_", " "), "pairs", "expected false pairs", "clusters",
                     "items to drop"],
                    [[("▶ " if r["is_run_threshold"] else "") + f"{r['threshold']:.4f}",
                      int(r["pairs"]) if a["exhaustive"] else round(r["pairs"], 1),
                      r["expected_false_pairs"], r["clusters"], r["items_to_drop"]]
                     for r in report["threshold_sweep"]])]
    c = report.get("curves")
    if c:
        parts += ["<h3>Error curves against the planted duplicates</h3>",
                  f"<p>{c['genuine_pairs']:,} planted pairs and {c['impostor_pairs']:,} other pairs scored. "
                  f"<b>AUC {c['auc']:.4f}</b>; equal error rate {c['eer']['rate']:.4f} at {c['eer']['threshold']:.4f}. "
                  f"Thresholds on a grid of {c['resolution']:.1e}.</p>",
                  "<div class='figs'>" + "".join(f"<img alt='{k}' src='{img[k]}'>" for k in ("roc", "det", "precision_recall")
                                                 if k in img) + "</div>",
                  _table(["target FMR", "threshold", "false matches", "impostor pairs", "FMR", "FMR 95% (exact)",
                          "TMR", "why not"],
                         [[r["target_fmr"], r.get("threshold"), r.get("false_matches"), r["impostor_pairs"],
                           r.get("fmr"), None if not r.get("fmr_95") else
                           f"{r['fmr_95'][0]:.2g} to {r['fmr_95'][1]:.2g}", r.get("tmr"), r.get("why")]
                          for r in c["at_fmr"]])]
    near = report["near_threshold"]
    parts += ["<h3>Near the threshold</h3>",
              f"<p>The weakest matches and the strongest pairs left out (of {html.escape(near['below_of'])}), "
              "where an eye is needed: pairs side by side with their score. <code>siamese-dedup review export</code> "
              "writes such pairs for labelling.</p>",
              f"<img alt='pairs near the threshold' src='{img['near_threshold']}'>"]
    return "\n".join(parts)


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    """report.html: self-contained (figures as base64 data URIs)."""
    t, c = report["threshold"], report["counts"]
    img = {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii") for k, v in figures.items()}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>siamese-dedup report</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 0.8em;color:#222}"
        ".scroll{overflow-x:auto}.figs{display:flex;flex-wrap:wrap;gap:0.5em}.figs img{max-width:min(100%,460px)}"
        "code{word-break:break-all}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right;font-size:13px}th{background:#f3f3f3}td:first-child{text-align:left}"
        "img{max-width:100%}.note{color:#a33}code{background:#f3f3f3;padding:1px 3px}",
        "</style></head><body>",
        "<h1>siamese-dedup report</h1>",
        f"<p>model <code>{html.escape(report['model_id'])}</code>, run <code>{html.escape(report['run_id'])}</code></p>",
        "<h2>Threshold</h2>",
        (f"<p>Pairs with angular similarity &ge; <b>{t['angular_similarity']:.6f}</b> "
         f"(cosine &ge; {t['cosine']:.6f}) are duplicates. Source:" if t.get("score", "angular_similarity")
         == "angular_similarity" else
         f"<p>Pairs whose kNN-normalised score (angular similarity less {t['knn']['beta']:g} x the mean of the "
         f"two items' similarities to their {t['knn']['k']}th nearest other item) is &ge; <b>{t['value']:.6f}</b> "
         "are duplicates. Source:") + f" <code>{html.escape(str(t['source']))}</code>"
        + (f": calibrated at false match rate {t['target_fmr']:g} on {t['impostor_pairs']} impostor pairs"
           if t.get("target_fmr") is not None else "" if t.get("self_calibration") or t.get("review") else
           ": given on the command line") + ".</p>",
        _review_html(t.get("review")),
        _self_calibration_html(t.get("self_calibration")),
        _choosing_html(report, img),
        _matching_html(report.get("matching") or {}),
        "<h2>Counts</h2>",
        _table(["items (templates)", "failures", "matched pairs", "duplicate clusters", "items to drop",
                "chained clusters"],
               [[c["items"], c["failures"], c["pairs"], c["clusters"], c["items_to_drop"],
                 c.get("chained_clusters")]]),
        "<h3>Failures by stage</h3>",
        _table(list(report["failures_by_stage"]), [list(report["failures_by_stage"].values())]),
    ]
    for note in report.get("notes") or []:
        parts.append(f"<p class='note'>Note: {html.escape(note)}</p>")
    ev = report.get("evaluation")
    if ev:
        levels = [(name, ev[key]) for name, key in (("matched pairs", "pairs"), ("pairs within clusters", "clusters"))
                  if ev.get(key)]
        parts += [
            "<h2>Against the planted duplicates</h2>",
            f"<p>{html.escape(ev['definition'])}.</p>",
            _table(["level", "precision", "recall", "F1", "found pairs", "predicted pairs", "planted pairs"],
                   [[name, x["precision"], x["recall"], x["f1"], x["found_pairs"], x["predicted_pairs"],
                     x["planted_pairs"]] for name, x in levels]),
            f"<p>Planted pairs with an item that never became a template: "
            f"{ev['planted_pairs_with_missing_items']}.</p>",
        ]
        if ev.get("families"):
            parts += ["<h3>By edit family</h3>",
                      _table(["edit family", "copies", "pair precision", "pair recall", "pair F1", "cluster F1"],
                             [[f, x["items"], x["pairs"]["precision"], x["pairs"]["recall"], x["pairs"]["f1"],
                               x["clusters"]["f1"]] for f, x in sorted(ev["families"].items())])]
        parts += [
            "<h3>Threshold sweep (from the matched pairs)</h3>",
            _table([ev.get("score", "angular similarity"), "matched pairs", "true matches", "false matches", "FNMR",
                    "FMR", "FMR upper 95%", "impostor pairs", "cluster precision", "cluster recall"],
                   [[s["threshold"], s["matched_pairs"], s["true_matches"], s["false_matches"], s["fnmr"],
                     s["fmr"], s["fmr_upper_95"], s["impostor_pairs"], s["cluster_precision"],
                     s["cluster_recall"]] for s in ev["sweep"]]),
        ]
    parts += [
        f"<h2>Histogram of the {html.escape(report['similarity_histogram']['of'])}</h2>",
        f"<img alt='similarity histogram' src='{img['similarity_hist']}'>",
        "<h2>Duplicate clusters</h2>",
        "<p>The largest and the weakest-linked clusters. Each row starts with the keeper (green frame); the "
        "others show their angular similarity to it. The weakest link is the smallest score (what the "
        "threshold cut) that holds the cluster together (the minimum edge of its maximum spanning tree).</p>",
        f"<img alt='duplicates gallery' src='{img['duplicates_gallery']}'>",
        "<p>Smallest member similarity: the least similar two members of the cluster. A cluster whose members "
        "lie far below the threshold from each other is held together only by a chain of links: it is flagged "
        "<b>chained</b> (dedup --linkage complete splits such clusters).</p>",
        _table(["cluster (keeper)", "size", "weakest link", "smallest member similarity", "chained", "members"],
               [[x["cluster_id"], x["size"], x["min_link_similarity"], x.get("min_member_similarity"),
                 "yes" if x.get("is_chained") else "no",
                 ", ".join(x["members"][:8]) + (" …" if len(x["members"]) > 8 else "")]
                for x in report.get("largest_clusters", [])]),
    ]
    card = report.get("model_card")
    if card:
        parts += ["<h2>Model card</h2>",
                  f"<p>model <code>{html.escape(card['model_id'])}</code>, {card['embedding_dim']} dimensions</p>",
                  _table(["metric", "value"], _flat_metrics(card["metrics"]))]
        for protocol, entries in (card.get("thresholds") or {}).items():
            parts += [f"<h3>Calibrated thresholds: {html.escape(protocol)}</h3>",
                      _table(["target FMR", "angular similarity", "cosine", "FMR", "FMR upper 95%", "FNMR",
                              "impostor pairs"],
                             [[e["target_fmr"], e["angular_similarity"], e["cosine"], e["fmr"], e["fmr_upper_95"],
                               e.get("fnmr"), e["impostor_pairs"]] for e in entries])]
    parts += ["<h2>Outputs</h2>", _table(["output", "path"], [[k, v] for k, v in report["outputs"].items()]),
              "</body></html>"]
    return "\n".join(parts)


def run(argv=None) -> dict:
    """Write the report; returns {"report_json", "report_html", "figures", "counts", "evaluation", ...}."""
    started = time.perf_counter()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.gallery_size < 0 or args.gallery_members < 1:
        raise ValueError("--gallery_size must be >= 0 and --gallery_members >= 1")
    workdir = args.workdir
    if args.linkage is not None and args.linkage not in clustering.LINKAGES:
        raise ValueError(f"--linkage must be one of {clustering.LINKAGES}, got {args.linkage!r}")
    bad = [x for x in args.target_fmr if not 0 < x < 1]
    if bad:
        raise ValueError(f"--target_fmr must lie in (0, 1), got {bad}")
    report, figures = build_report(workdir, model_dir=args.model_dir, ground_truth=args.ground_truth,
                                   gallery_size=args.gallery_size, gallery_members=args.gallery_members,
                                   manifest=args.manifest, linkage=args.linkage,
                                   target_fmrs=tuple(sorted(set(score_distribution.TARGET_FMRS) | set(args.target_fmr),
                                                            reverse=True)))
    join = FileSystems.join
    figure_paths = {name: join(workdir, "figures", f"{name}.png") for name in figures}
    report_json, report_html = join(workdir, "report.json"), join(workdir, "report.html")
    report["outputs"] = {
        "report_json": report_json,
        "report_html": report_html,
        **{f"figure_{k}": v for k, v in figure_paths.items()},
        "templates": bio.table_glob(workdir, "templates"),
        "failures": bio.table_glob(workdir, "failures"),
        "matches": bio.table_glob(workdir, "matches"),
        "clusters": bio.table_glob(workdir, "clusters"),
        "match_run": join(workdir, "match_run.json"),
    }
    # JSON round trip: numpy scalars to plain numbers before validation.
    report = json.loads(json.dumps(report, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
    try:
        validate_report(report)
    except SchemaError as err:
        raise SchemaError(f"the report does not follow its contract: {err}") from err
    with outputs.StagedRun(workdir, "report", new_run_id()) as staged:
        for name, data in figures.items():
            _write_bytes(staged.path(f"figures/{name}.png"), data, "image/png")
        _write_bytes(staged.path("report.html"), render_html(report, figures).encode("utf-8"), "text/html")
        bio.write_json(staged.path("report.json"), report)
        staged.publish()
    evaluation = report.get("evaluation")
    LOG.info("report: %s", report_html)
    return {
        "report_json": report_json,
        "report_html": report_html,
        "figures": list(figure_paths.values()),
        "counts": report["counts"],
        "threshold": report["threshold"],
        "evaluation": None if not evaluation else {
            k: evaluation.get(k) for k in ("precision", "recall", "f1", "found_pairs", "predicted_pairs",
                                           "planted_pairs", "pairs", "clusters", "families")
        },
        "seconds": round(time.perf_counter() - started, 3),
    }


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
