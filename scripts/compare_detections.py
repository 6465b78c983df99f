#!/usr/bin/env python3
"""Compare two COCO results files (e.g. `kestrel eval --results` in f32 and in bf16).

For every detection of A above --score, looks for a detection of B on the same image
with the same category whose box differs by at most --px pixels in every coordinate
(x1, y1, x2, y2). Prints how many have such a twin and lists those that do not, with
the nearest same-category box of B (largest coordinate difference, its score, IoU).

    python3 scripts/compare_detections.py A.json B.json [--score 0.5] [--px 1]
"""
import argparse
import collections
import json
import sys


def corners(d):
    x, y, w, h = d["bbox"]
    return [x, y, x + w, y + h]


def iou(p, q):
    ix = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    iy = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = ix * iy
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0


def twins(a, b, score=0.5, px=1.0):
    """Detections of A above `score` with a same-image, same-category twin in B within
    `px` pixels in every corner coordinate: (matched, total, misses), each miss as
    (detection of A, (largest coordinate difference, nearest same-category box of B)
    or None)."""
    by_image = collections.defaultdict(list)
    for d in b:
        by_image[d["image_id"]].append(d)
    total = matched = 0
    misses = []
    for d in a:
        if d["score"] <= score:
            continue
        total += 1
        box = corners(d)
        best = None
        for e in by_image[d["image_id"]]:
            if e["category_id"] != d["category_id"]:
                continue
            diff = max(abs(p - q) for p, q in zip(box, corners(e)))
            if best is None or diff < best[0]:
                best = (diff, e)
        if best is not None and best[0] <= px:
            matched += 1
        else:
            misses.append((d, best))
    return matched, total, misses


def report(a, b, score=0.5, px=1.0, a_name="A", b_name="B"):
    """Prints [`twins`]'s count and its misses; returns (matched, total)."""
    matched, total, misses = twins(a, b, score, px)
    print(f"{matched} of {total} detections of {a_name} with score > {score} have a "
          f"same-category twin in {b_name} within {px} px")
    for d, best in misses:
        if best is None:
            print(f"  image {d['image_id']} score {d['score']:.3f}: no same-category box in {b_name}")
        else:
            diff, e = best
            print(f"  image {d['image_id']} score {d['score']:.3f}: nearest in {b_name} differs by "
                  f"{diff:.2f} px (score {e['score']:.3f}, IoU {iou(corners(d), corners(e)):.3f})")
    return matched, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--score", type=float, default=0.5)
    ap.add_argument("--px", type=float, default=1.0)
    args = ap.parse_args()
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    report(a, b, args.score, args.px)
    return 0


if __name__ == "__main__":
    sys.exit(main())
