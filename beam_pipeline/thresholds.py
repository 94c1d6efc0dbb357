"""Which match threshold a run uses, and where it came from.

A threshold is either given (angular similarity on the command line) or read from the model card's
calibration: card["thresholds"][protocol] is a list of THRESHOLD_SCHEMA entries (schemas/documents.py),
one per target false match rate. The result states both the angular similarity and the cosine the kernel
compares with (siamese_core.similarity.cosine_from_angular), so report.json can say exactly what was used.
"""
from __future__ import annotations

import math

from siamese_core.similarity import cosine_from_angular

# The highest threshold a run may use. Embeddings are float32: a cosine near 1 is resolved to ~6e-8, so an
# angular similarity above this cannot be told apart from 1 (cos(pi * 1e-4) = 1 - 4.9e-8 rounds to 1.0,
# and two items of identical content, whose dot product is 1 - 1e-7, would not match each other).
MAX_THRESHOLD = 0.999
# Two FMR targets are the same if they agree to this relative tolerance (1e-4 written as 0.0001 etc.).
_FMR_RTOL = 1e-6


# How a run's threshold is chosen, by the flag that asks for it (at most one is given; none: self-calibrated).
METHODS = {"threshold": "given", "target_fmr": "model_card", "target_precision": "self_calibrated",
           "max_false_pairs": "self_calibrated", "review_threshold": "review"}


def threshold_method(threshold=None, target_fmr=None, target_precision=None, max_false_pairs=None,
                     review_threshold=None) -> str:
    """"given", "model_card", "review" or "self_calibrated" (the default), from the threshold flags of a run.
    Raises ValueError when more than one flag is given (one would silently override the others)."""
    given = {k: v for k, v in (("threshold", threshold), ("target_fmr", target_fmr),
                               ("target_precision", target_precision), ("max_false_pairs", max_false_pairs),
                               ("review_threshold", review_threshold))
             if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join('--' + k for k in METHODS)}; "
                         f"got {', '.join('--' + k for k in given)}")
    return METHODS[next(iter(given))] if given else "self_calibrated"


# A threshold says what it cuts (the matches' `score` column): "angular_similarity", or "knn_normalised"
# (report.json's schema lists the same two).


def angular_cut(similarity: float) -> dict:
    """The threshold keys of a cut on angular similarity: value (what the matches' score is compared with),
    score, and the angular similarity with the cosine the kernel compares."""
    return {"value": float(similarity), "score": "angular_similarity", "angular_similarity": float(similarity),
            "cosine": float(cosine_from_angular(similarity))}


def knn_cut(value: float, k: int, beta: float) -> dict:
    """The threshold keys of a cut on kNN-normalised scores (siamese_core.similarity.knn_normalised): it is no
    angular similarity, so those keys are None; k and beta say how the score was made."""
    return {"value": float(value), "score": "knn_normalised", "knn": {"k": int(k), "beta": float(beta)},
            "angular_similarity": None, "cosine": None}


def _fmr_text(x: float) -> str:
    return f"{x:g}"


def resolve_threshold(
    threshold: float | None, model_card: dict | None, target_fmr: float, protocol: str
) -> dict:
    """The threshold of a run: {"value", "score", "angular_similarity", "cosine", "source", "target_fmr",
    "impostor_pairs"} (angular_cut).

    - `threshold` given (angular similarity in [0, 1]): source "given"; target_fmr and impostor_pairs
      are None (nothing calibrated it).
    - otherwise the entry of `model_card["thresholds"][protocol]` whose target_fmr equals `target_fmr`:
      source "model_card:<protocol>@fmr=<target_fmr>", with the number of impostor pairs behind it.
    Raises ValueError when neither is available, or when the card has no threshold for that protocol
    and FMR (the message names the ones it has).
    """
    if threshold is not None:
        sim = float(threshold)
        if not (0.0 <= sim <= MAX_THRESHOLD) or math.isnan(sim):
            raise ValueError(f"--threshold is an angular similarity in [0, {MAX_THRESHOLD}] (float32 embeddings "
                             f"cannot resolve more), got {threshold}")
        return {
            **angular_cut(sim),
            "source": "given",
            "target_fmr": None,
            "impostor_pairs": None,
        }
    if model_card is None:
        raise ValueError("no threshold: pass --threshold (angular similarity) or --model_dir with a model card")
    if target_fmr is None or not (0.0 < float(target_fmr) <= 1.0):
        raise ValueError(f"target FMR must lie in (0, 1], got {target_fmr}")
    by_protocol = model_card.get("thresholds") or {}
    entries = by_protocol.get(protocol)
    model = model_card.get("model_id", "?")
    if not entries:
        available = sorted(k for k, v in by_protocol.items() if v)
        raise ValueError(
            f"model card {model} has no calibrated thresholds for protocol {protocol!r}; "
            f"protocols with thresholds: {available or 'none'}. Pass --threshold or another "
            "--threshold_protocol"
        )
    for entry in entries:
        if math.isclose(float(entry["target_fmr"]), float(target_fmr), rel_tol=_FMR_RTOL):
            return {
                **angular_cut(float(entry["angular_similarity"])),
                "source": f"model_card:{protocol}@fmr={_fmr_text(float(target_fmr))}",
                "target_fmr": float(entry["target_fmr"]),
                "impostor_pairs": int(entry["impostor_pairs"]),
            }
    have = sorted(float(e["target_fmr"]) for e in entries)
    raise ValueError(
        f"model card {model} has no {protocol!r} threshold at FMR {_fmr_text(float(target_fmr))}; it has "
        f"FMR {', '.join(_fmr_text(x) for x in have)}. Pass one of these as --target_fmr, or --threshold"
    )
