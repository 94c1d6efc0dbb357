"""Recall of one matches table against another over every pair (e.g. approximate against exact).

    .venv/bin/python bench/compare_matches.py EXACT_GLOB APPROX_GLOB
prints {"exact_pairs", "approx_pairs", "found", "not_in_exact", "recall_all_pairs"}.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_pipeline.blocks import iter_parquet_batches  # noqa: E402


def pairs(glob: str) -> set:
    out = set()
    for _, batch in iter_parquet_batches(glob, ["left_id", "right_id"], "matches"):
        out.update(zip(batch.column("left_id").to_pylist(), batch.column("right_id").to_pylist()))
    return out


def main(argv=None) -> dict:
    exact_glob, approx_glob = (argv or sys.argv[1:])[:2]
    exact, approx = pairs(exact_glob), pairs(approx_glob)
    result = {"exact_pairs": len(exact), "approx_pairs": len(approx), "found": len(exact & approx),
              "not_in_exact": len(approx - exact),
              "recall_all_pairs": len(exact & approx) / len(exact) if exact else None}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
