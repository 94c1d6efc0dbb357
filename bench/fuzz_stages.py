"""Fuzz the stage sequence and the command line: random orders of embed / match / dedup / report over a
catalogue that changes between runs, with random faults and random user mistakes.

    flock /tmp/heavy.lock .venv/bin/python bench/fuzz_stages.py [--runs 220] [--seed 0] [--work_dir DIR]

Each step first may change the catalogue (add, remove or replace an image, add a byte-identical copy, a
broken file or a dangling link), then runs one stage through `beam_pipeline.cli.main`, in-process (half
the time the stage after the last one that succeeded, else any), in one of four ways:
- clean: the stage as a user would run it; it must succeed (exit 0) or refuse with one clear line
  (exit 2) when its inputs are missing (e.g. dedup before any match);
- mistake: a random user error (a flag out of range, a misspelt flag, a glob that matches nothing, a
  model card that is not JSON, two threshold flags): exit 2, one line on stderr, no traceback, and the
  outputs exactly as they were;
- fault: an exception injected inside the stage's pipeline, or while it publishes: the command fails
  and the outputs are exactly as they were (file names and bytes, `stale/` aside);
- interrupt: KeyboardInterrupt just before publishing: exit 130, outputs as they were.
After every step the work directory is checked (`check_workdir`):
- lost items: every entry of the catalogue as the last published embed listed it is in templates or
  failures exactly once;
- silently wrong outputs: matches, clusters, match_run.json and report.json present in the work directory
  must have been made from the templates there (their lineage), matches must be exactly the pairs at or
  above their threshold (recomputed from the embeddings; a quarter of the match runs that are not mistakes
  cut kNN-normalised scores, recomputed likewise), clusters must cover exactly the template items;
- debris: no `_staging` directory, no `beam-temp-*` directory.
Prints a line per step, a table of outcomes and a JSON summary; exits 1 on any lost item, silently wrong
output, traceback for a user error, or debris.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

STAGES = ("embed", "match", "dedup", "report")
MODES = ("clean", "clean", "clean", "mistake", "fault", "interrupt")  # clean runs most often
THRESHOLD = 0.999  # the untrained encoder puts noise images close together: mostly copies match
# A share of the clean and faulty match runs cut kNN-normalised scores (match --score_norm knn) instead;
# the noise images' 10th neighbours sit near 0.998, so their scores sit near 0.5.
KNN_SHARE = 0.25
KNN_THRESHOLD = 0.5004
# Angular similarity near 1 from float32 embeddings is resolved to about 1e-4.
TOLERANCE = 2e-4
MISTAKES = {
    "embed": [["--max_pixels", "-1"], ["--batch_size", "0"], ["--bogus_flag", "1"], ["GLOB_NOTHING"],
              ["CARD_NOT_JSON"]],
    "match": [["--threshold", "1.5"], ["--threshold", "0.9", "--target_fmr", "0.01"], ["--threshhold", "0.9"],
              ["--block_size", "zero"], ["TEMPLATES_NOTHING"]],
    "dedup": [["--threshold", "-0.1"], ["--keeper_policy", "column"], ["--chain_margin", "x"],
              ["MATCHES_NOTHING"]],
    "report": [["--gallery_size", "-1"], ["--ground_truth", "/nonexistent.csv"], ["WORKDIR_NOTHING"]],
}


# --------------------------------------------------------------------------------------------- catalogue

class Catalogue:
    """A directory of small PNGs that changes between runs, deterministically for a seed."""

    def __init__(self, root: str, rng: random.Random):
        self.root = root
        self.rng = rng
        self.next_id = 0
        os.makedirs(root, exist_ok=True)
        for _ in range(8):
            self.add()

    def _png(self, path: str, seed: int) -> None:
        from PIL import Image

        pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(path)

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def images(self) -> list[str]:
        return [e for e in self.entries() if os.path.isfile(os.path.join(self.root, e))
                and not e.startswith("broken")]

    def add(self) -> str:
        name = f"img{self.next_id:04d}.png"
        self._png(os.path.join(self.root, name), 10_000 + self.next_id)
        self.next_id += 1
        return f"add {name}"

    def change(self) -> str:
        """One random change to the catalogue (or none)."""
        images = self.images()
        kind = self.rng.choice(["none", "none", "add", "remove", "replace", "copy", "broken", "dangling"])
        if kind == "add" or (kind in ("remove", "replace", "copy") and len(images) < 3):
            return self.add()
        if kind == "remove":
            victim = self.rng.choice(self.entries())
            os.remove(os.path.join(self.root, victim))
            return f"remove {victim}"
        if kind == "replace":
            victim = self.rng.choice(images)
            self._png(os.path.join(self.root, victim), 50_000 + self.next_id)
            self.next_id += 1
            return f"replace {victim}"
        if kind == "copy":
            source = self.rng.choice(images)
            name = f"copy{self.next_id:04d}.png"
            self.next_id += 1
            shutil.copy(os.path.join(self.root, source), os.path.join(self.root, name))
            return f"copy {source} -> {name}"
        if kind == "broken":
            name = f"broken{self.next_id:04d}.png"
            self.next_id += 1
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n" + bytes(self.rng.randrange(256) for _ in range(20)))
            return f"broken {name}"
        if kind == "dangling":
            name = f"link{self.next_id:04d}.png"
            self.next_id += 1
            os.symlink(f"missing{self.next_id}.png", os.path.join(self.root, name))
            return f"dangling {name}"
        return "no change"


# -------------------------------------------------------------------------------------------- the checks

def snapshot(work: str) -> dict:
    """{relative path: sha256} of every file under `work` except stale/ (moved-aside outputs)."""
    found = {}
    for directory, dirs, files in os.walk(work):
        rel = os.path.relpath(directory, work)
        if rel.split(os.sep)[0] == "stale":
            continue
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.normpath(os.path.join(rel, name))] = hashlib.sha256(f.read()).hexdigest()
    return found


def check_workdir(work: str, embedded_entries: set | None) -> list[str]:
    """The problems of a work directory (see the module docstring); [] when it is sound."""
    from beam_pipeline import outputs
    from beam_pipeline.io import read_json, read_table_dir, table_glob
    from schemas.tables import embeddings_as_numpy
    from siamese_core.similarity import angular_similarity, knn_normalised, kth_neighbour_similarity

    problems = []
    for directory, dirs, _ in os.walk(work):
        for d in dirs:
            if d == "_staging" or d.startswith("beam-temp-"):
                problems.append(f"debris: {os.path.relpath(os.path.join(directory, d), work)}")
    if not os.path.isdir(os.path.join(work, "templates")):
        for name in ("matches", "clusters", "report.json"):
            if os.path.exists(os.path.join(work, name)):
                problems.append(f"silently wrong: {name} without templates")
        return problems
    templates = read_table_dir(work, "templates")
    failures = read_table_dir(work, "failures")
    ids = templates.column("item_id").to_pylist() + failures.column("item_id").to_pylist()
    if len(ids) != len(set(ids)):
        problems.append("doubled: an item is in templates and failures more than once")
    if embedded_entries is not None and set(ids) != embedded_entries:
        problems.append(f"lost items: {sorted(embedded_entries - set(ids))[:5]}, extra {sorted(set(ids) - embedded_entries)[:5]}")
    fingerprint = outputs.templates_fingerprint(table_glob(work, "templates"))["fingerprint"]
    matches_run = None
    if os.path.isdir(os.path.join(work, "matches")):
        lineage = outputs.single_run(table_glob(work, "matches"), "matches", "match")
        matches_run = lineage["run_id"]
        if lineage["templates"]["fingerprint"] != fingerprint:
            problems.append("silently wrong: matches made from other templates sit beside these")
        else:
            matches = read_table_dir(work, "matches")
            emb = embeddings_as_numpy(templates)
            tids = templates.column("item_id").to_pylist()
            sim = angular_similarity(emb @ emb.T).astype(np.float64)
            cut = lineage["threshold"]
            if lineage.get("score") == "knn_normalised":
                knn = read_json(os.path.join(work, "match_run.json"))["threshold"]["knn"]
                b = kth_neighbour_similarity(emb, emb, knn["k"], same_set=True)
                sim = knn_normalised(sim, b[:, None], b[None, :], knn["beta"]).astype(np.float64)
            want = {(a, b) for i, a in enumerate(tids) for j, b in enumerate(tids)
                    if i != j and a < b and sim[i, j] >= cut + TOLERANCE}
            maybe = {(a, b) for i, a in enumerate(tids) for j, b in enumerate(tids)
                     if i != j and a < b and sim[i, j] >= cut - TOLERANCE}
            got = set(zip(matches.column("left_id").to_pylist(), matches.column("right_id").to_pylist()))
            if not (want <= got <= maybe):
                problems.append(f"silently wrong: matches are not the pairs at or above {cut}")
        run_doc = os.path.join(work, "match_run.json")
        if not os.path.exists(run_doc) or read_json(run_doc).get("run_id") != matches_run:
            problems.append("silently wrong: match_run.json is not the matches' run")
    elif os.path.exists(os.path.join(work, "match_run.json")):
        problems.append("silently wrong: match_run.json without matches")
    if os.path.isdir(os.path.join(work, "clusters")):
        lineage = outputs.single_run(table_glob(work, "clusters"), "clusters", "dedup")
        clusters = read_table_dir(work, "clusters")
        if lineage["matches"]["run_id"] != matches_run or lineage["templates"]["fingerprint"] != fingerprint:
            problems.append("silently wrong: clusters made from other matches or templates sit beside these")
        elif sorted(clusters.column("item_id").to_pylist()) != sorted(templates.column("item_id").to_pylist()):
            problems.append("silently wrong: clusters do not cover exactly the template items")
    if os.path.exists(os.path.join(work, "report.json")):
        doc = read_json(os.path.join(work, "report.json"))
        if doc["lineage"]["templates"]["fingerprint"] != fingerprint or doc["lineage"]["match_run_id"] != matches_run:
            problems.append("silently wrong: report.json made from other outputs sits beside these")
    return problems


# ----------------------------------------------------------------------------------------------- a step

def stage_argv(stage: str, cat: str, model: str, work: str) -> list[str]:
    return {
        "embed": ["embed", "--input", f"{cat}/*.png", "--model_dir", model, "--output", work],
        "match": ["match", "--templates", f"{work}/templates/*.parquet", "--output", work,
                  "--threshold", str(THRESHOLD)],
        "dedup": ["dedup", "--templates", f"{work}/templates/*.parquet", "--matches", f"{work}/matches/*.parquet",
                  "--output", work],
        "report": ["report", "--workdir", work],
    }[stage]


def apply_mistake(argv: list[str], mistake: list[str], tmp: str) -> list[str]:
    token = mistake[0]
    if token == "GLOB_NOTHING":
        return [a if not a.endswith("*.png") else f"{tmp}/nothing/*.png" for a in argv]
    if token in ("TEMPLATES_NOTHING", "MATCHES_NOTHING"):
        key = "--templates" if token == "TEMPLATES_NOTHING" else "--matches"
        out = list(argv)
        out[out.index(key) + 1] = f"{tmp}/nothing/*.parquet"
        return out
    if token == "WORKDIR_NOTHING":
        return ["report", "--workdir", f"{tmp}/nothing"]
    if token == "CARD_NOT_JSON":
        bad = os.path.join(tmp, "bad_model")
        os.makedirs(bad, exist_ok=True)
        with open(os.path.join(bad, "model_card.json"), "w") as f:
            f.write("{not json")
        out = list(argv)
        out[out.index("--model_dir") + 1] = bad
        return out
    return argv + mistake


FAULT_POINTS = {
    "embed": "beam_pipeline.embed.ToTemplatesFn.process",
    "match": "beam_pipeline.match.ExactStripFn.process",
    "dedup": "beam_pipeline.dedup.cluster_tables",
    "report": "beam_pipeline.report_figures.gallery_png",
}


class InjectedFault(RuntimeError):
    pass


def run_step(stage: str, mode: str, argv: list[str], rng: random.Random):
    """Run one command; returns (exit code or exception name, stderr, whether an injected fault fired)."""
    from unittest import mock

    from beam_pipeline import cli, outputs

    patches, fired = [], []

    def fault(*_, **__):
        fired.append(True)
        raise InjectedFault("injected fault")

    if mode == "fault":
        if rng.random() < 0.5:
            patches.append(mock.patch(FAULT_POINTS[stage], fault))
        else:  # while publishing: the first or the second move fails, after the other has been made
            real, calls, fail_at = outputs._move, [], rng.choice([1, 2])

            def flaky(src, dst):
                calls.append(src)
                if len(calls) == fail_at:
                    fired.append(True)
                    raise OSError("injected fault while publishing")
                real(src, dst)

            patches.append(mock.patch.object(outputs, "_move", flaky))
    elif mode == "interrupt":
        def interrupted(self, *a, **k):
            fired.append(True)
            raise KeyboardInterrupt

        patches.append(mock.patch.object(outputs.StagedRun, "publish", interrupted))
    err, out = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(out))
        try:
            code = cli.main(["--log_level", "ERROR", *argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        except BaseException as exc:  # noqa: BLE001 - the fuzz records whatever escapes
            code = type(exc).__name__
            err.write(traceback.format_exc())
    return code, err.getvalue(), bool(fired)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=220)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/fuzz_stages")
    parser.add_argument("--json", default=None, help="Write the summary here too.")
    args = parser.parse_args(argv)

    import keras

    from trainer.encoder import build_encoder
    from siamese_core.artefact import export_encoder

    rng = random.Random(args.seed)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    model = os.path.join(args.work_dir, "model")
    keras.utils.set_random_seed(args.seed)
    spec = {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}
    export_encoder(build_encoder(spec, 8, filters=(4,), dense_units=0, dropout=0.0), model,
                   training={"note": "untrained fuzz fixture"}, data={}, metrics={},
                   thresholds={"instance": [], "class": []}, input_spec=spec)
    cat = Catalogue(os.path.join(args.work_dir, "catalogue"), rng)
    work = os.path.join(args.work_dir, "work")
    embedded_entries = None  # the catalogue's entries when the last published embed listed them
    last_ok = None
    outcomes = collections.Counter()
    findings = []
    knn_pairs = []  # pairs of each published kNN-normalised match run
    started = time.perf_counter()
    for step in range(args.runs):
        change = cat.change()
        # Half the time the stage after the last one that succeeded, so the sequence often gets as far as
        # a report; otherwise any stage, in any order.
        stage = STAGES[(STAGES.index(last_ok) + 1) % len(STAGES)] if last_ok and rng.random() < 0.5 \
            else rng.choice(STAGES)
        mode = rng.choice(MODES)
        argv = stage_argv(stage, cat.root, model, work)
        if mode == "mistake":
            argv = apply_mistake(argv, rng.choice(MISTAKES[stage]), args.work_dir)
        knn = mode != "mistake" and stage == "match" and rng.random() < KNN_SHARE
        if knn:
            argv = argv[:argv.index("--threshold")] + ["--threshold", str(KNN_THRESHOLD), "--score_norm", "knn"]
        before = snapshot(work) if os.path.isdir(work) else {}
        entries_now = set(cat.entries())
        code, err, fired = run_step(stage, mode, argv, rng)
        after = snapshot(work) if os.path.isdir(work) else {}
        problems = []
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if mode == "clean":
            if code == 0 and stage == "embed":
                embedded_entries = entries_now
            elif code not in (0, 2):
                problems.append(f"clean run ended with {code}: {err[-600:]}")
            if code == 2 and (len(lines) != 1 or "Traceback" in err):
                problems.append(f"refusal is not one line: {err[-600:]}")
        elif mode == "mistake":
            if code != 2 or "Traceback" in err or len(lines) > 1 and "error:" not in lines[-1]:
                problems.append(f"traceback or wrong status for a user error ({code}): {err[-600:]}")
        elif mode == "interrupt" and code not in (130, 2):
            problems.append(f"interrupt ended with {code}")
        if mode != "clean" and code != 0 and before != after:
            problems.append("a failed run changed the outputs")
        if fired and code == 0:
            problems.append("an injected fault went unnoticed")
        problems += check_workdir(work, embedded_entries)
        if code == 0:
            last_ok = stage
            if knn:  # kNN runs that matched something: the check above had pairs to recompute
                knn_pairs.append(json.load(open(os.path.join(work, "match_run.json")))["pairs"])
        label = f"{stage}{'(knn)' if knn else ''}"
        outcomes[f"{label}/{mode}/{code}"] += 1
        print(f"{step:4d} {change:<28s} {label:<10s} {mode:<9s} -> {code!s:<18s} "
              f"{'OK' if not problems else 'PROBLEM: ' + '; '.join(problems)}", flush=True)
        findings += [{"step": step, "stage": stage, "mode": mode, "problem": p} for p in problems]

    kinds = collections.Counter(p["problem"].split(":")[0] for p in findings)
    summary = {
        "runs": args.runs, "seed": args.seed, "seconds": round(time.perf_counter() - started, 1),
        "lost_items": sum(1 for p in findings if p["problem"].startswith("lost")),
        "silently_wrong": sum(1 for p in findings if p["problem"].startswith(("silently", "doubled"))),
        "tracebacks_for_user_errors": sum(1 for p in findings if "traceback" in p["problem"]
                                          or "not one line" in p["problem"]),
        "debris": sum(1 for p in findings if p["problem"].startswith("debris")),
        "other_problems": sum(kinds.values()),
        "knn_match_runs": len(knn_pairs), "knn_match_runs_with_pairs": sum(1 for k in knn_pairs if k),
        "outcomes": dict(sorted(outcomes.items())),
        "findings": findings[:50],
    }
    print("\noutcome (stage/mode/exit)            runs")
    for outcome, n in sorted(outcomes.items()):
        print(f"  {outcome:<34s} {n}")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("outcomes", "findings")}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
