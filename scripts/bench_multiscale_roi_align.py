#!/usr/bin/env python3
"""torchvision's MultiScaleRoIAlign forward and backward on the CPU at R50-FPN size.

FPN maps P2..P5 (256 channels) of a batch of 800x1216 images, output 7x7,
sampling_ratio 2 (torchvision's box_roi_pool), boxes as benches/roi_align.rs (sides
log-uniform in 8..600 px, clipped): training (512 RoIs per image, forward and
backward of sum(out * g)) and inference (1000 RoIs per image, forward). Prints the
median and range of --iters timed runs after one warm-up, in ms, and CPU time
(user + sys of the process) per run. Compare with Kestrel's
`cargo bench --bench roi_align` (same shapes and box distribution).

    KESTREL_TORCH_VENV=/work/torchvenv; $KESTREL_TORCH_VENV/bin/python \
        scripts/bench_multiscale_roi_align.py --batch 2 --iters 5 [--threads 2]
"""
import argparse
import math
import os
import random
import time

import torch
from torchvision.ops import MultiScaleRoIAlign

SIZES = [(200, 304), (100, 152), (50, 76), (25, 38)]


def boxes(rng, n, h=800.0, w=1216.0):
    out = []
    for _ in range(n):
        side = 8.0 * 75.0 ** rng.random()
        bw, bh = side * rng.uniform(0.5, 2.0), side
        x1, y1 = rng.uniform(0.0, w - 1.0), rng.uniform(0.0, h - 1.0)
        out.append([x1, y1, min(x1 + bw, w), min(y1 + bh, h)])
    return torch.tensor(out, dtype=torch.float32)


def timed(f, iters):
    f()
    walls, cpus = [], []
    for _ in range(iters):
        c0, w0 = time.process_time(), time.perf_counter()
        f()
        walls.append((time.perf_counter() - w0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    walls.sort()
    cpus.sort()
    return walls[len(walls) // 2], walls[0], walls[-1], cpus[len(cpus) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    feats = {
        str(i): torch.rand(a.batch, 256, h, w, generator=g) * 2 - 1
        for i, (h, w) in enumerate(SIZES)
    }
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    sizes = [(800, 1216)] * a.batch
    rng = random.Random(1)
    for name, per_image, train in [("train", 512, True), ("infer", 1000, False)]:
        props = [boxes(rng, per_image) for _ in range(a.batch)]
        if train:
            leaf = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
            out = pool(leaf, props, sizes)
            gy = torch.rand(out.shape, generator=g)

            def fwd():
                with torch.no_grad():
                    pool(feats, props, sizes)

            def fwd_bwd():
                for v in leaf.values():
                    v.grad = None
                (pool(leaf, props, sizes) * gy).sum().backward()

            f = timed(fwd, a.iters)
            fb = timed(fwd_bwd, a.iters)
            print(f"torchvision MultiScaleRoIAlign b{a.batch} {name} {per_image}/image forward "
                  f"{f[0]:.1f} [{f[1]:.1f}-{f[2]:.1f}] ms (cpu {f[3]:.1f})")
            print(f"torchvision MultiScaleRoIAlign b{a.batch} {name} {per_image}/image forward+backward "
                  f"{fb[0]:.1f} [{fb[1]:.1f}-{fb[2]:.1f}] ms (cpu {fb[3]:.1f}), backward ~{fb[0] - f[0]:.1f}")
        else:
            def fwd():
                with torch.no_grad():
                    pool(feats, props, sizes)

            f = timed(fwd, a.iters)
            print(f"torchvision MultiScaleRoIAlign b{a.batch} {name} {per_image}/image forward "
                  f"{f[0]:.1f} [{f[1]:.1f}-{f[2]:.1f}] ms (cpu {f[3]:.1f})")


if __name__ == "__main__":
    main()
