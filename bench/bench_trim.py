"""Border trimming on a photo catalogue with planted copies: does decode cut what an edit added, and only that?

    .venv/bin/python bench/bench_trim.py --catalogue CAT [--json OUT]

CAT is a catalogue as `make demo` writes it (CAT/images, CAT/manifest.csv with each copy's edit family).
siamese_core.decode.border_box runs on every non-broken image, and each is judged by what its family
should leave (the demo's originals are square 256 px tiles):
- originals, and copies whose edit adds no band (crop, rotate, overlay_text): nothing cut;
- caption, pad, border (the edit grows the canvas around the square photo): the kept box is square within 5%;
- screenshot (window chrome around a scaled photo): something cut and the kept box square within 8%.
Other families are not judged. Prints one line per family: right / judged.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTOUCHED = ("original", "crop", "rotate", "overlay_text")
GROWN = {"caption": 0.05, "pad": 0.05, "border": 0.05}
CHROME = {"screenshot": 0.08}


def judge(family: str, shape: tuple[int, int], box: tuple[int, int, int, int]) -> bool | None:
    """Whether `box` (top, bottom, left, right) is what trimming should keep of an image of `shape` (h, w)
    planted by `family` ("original" for an original); None for a family that is not judged."""
    h, w = shape
    top, bottom, left, right = box
    kept_h, kept_w = bottom - top, right - left
    if family in UNTOUCHED:
        return (kept_h, kept_w) == (h, w)
    if family in GROWN:
        return abs(kept_h / kept_w - 1.0) <= GROWN[family]
    if family in CHROME:
        return kept_h * kept_w < h * w and abs(kept_h / kept_w - 1.0) <= CHROME[family]
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogue", required=True, help="CAT: images/ and manifest.csv")
    p.add_argument("--json", default=None, help="write the counts here")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import numpy as np
    from PIL import Image

    from siamese_core.decode import border_box

    with open(os.path.join(args.catalogue, "manifest.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["broken"]]
    counts: dict[str, list[int]] = {}
    for r in rows:
        family = r["edit"] or "original"
        with Image.open(os.path.join(args.catalogue, "images", r["item_id"])) as image:
            pixels = np.asarray(image.convert("RGB"))
        verdict = judge(family, pixels.shape[:2], border_box(pixels))
        if verdict is not None:
            tally = counts.setdefault(family, [0, 0])
            tally[0] += int(verdict)
            tally[1] += 1
    for family, (right, judged) in sorted(counts.items()):
        print(f"{family:14s} {right:4d} / {judged:4d}")
    result = {family: {"right": right, "judged": judged} for family, (right, judged) in counts.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
