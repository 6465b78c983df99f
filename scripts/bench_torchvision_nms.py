#!/usr/bin/env python3
"""torchvision's NMS on the inputs of `cargo bench --bench detection -- nms/`.

Not part of CI. Run it in its own venv with torch and torchvision installed:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision
    /tmp/tv/bin/python scripts/bench_torchvision_nms.py [--threads 2] [--device cpu|cuda]

The boxes are generated exactly as benches/detection.rs `detector_like_boxes` does
(kestrel::rng::Rng is SplitMix64; same draws, same order, cast to f32), so the two
benches time the same inputs. `--print-boxes N` prints the first boxes of the 1000-box
input without importing torch, to check the generator against the Rust one.
"""
import argparse
import math
import struct
import sys
import time

MASK = (1 << 64) - 1


class Rng:
    """kestrel::rng::Rng (SplitMix64) in Python."""

    def __init__(self, seed):
        self.s = seed & MASK

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def range(self, lo, hi):
        return lo + (hi - lo) * self.uniform()

    def normal(self):
        u1 = max(self.uniform(), sys.float_info.min)
        u2 = self.uniform()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def below(self, n):
        return self.next_u64() % max(n, 1)


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def detector_like_boxes(seed, n):
    """benches/detection.rs detector_like_boxes: boxes [n][4] and scores [n] (f32 values)."""
    r = Rng(seed)
    objects = []
    for _ in range(max(n // 50, 1)):
        w = math.exp(r.range(math.log(16.0), math.log(400.0)))
        h = math.exp(r.range(math.log(16.0), math.log(400.0)))
        objects.append((r.range(0.0, 1216.0), r.range(0.0, 800.0), w, h))
    boxes, scores = [], []
    for _ in range(n):
        cx, cy, w, h = objects[r.below(len(objects))]
        cx, cy = cx + 0.1 * w * r.normal(), cy + 0.1 * h * r.normal()
        w, h = w * r.range(0.8, 1.25), h * r.range(0.8, 1.25)
        boxes.append([f32(cx - w / 2.0), f32(cy - h / 2.0), f32(cx + w / 2.0), f32(cy + h / 2.0)])
        scores.append(f32(r.uniform()))
    return boxes, scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1000,5000,20000,100000")
    ap.add_argument("--iou", type=float, default=0.7)
    ap.add_argument("--print-boxes", type=int, default=0)
    a = ap.parse_args()
    if a.print_boxes:
        boxes, scores = detector_like_boxes(1000, 1000)
        for b, s in list(zip(boxes, scores))[: a.print_boxes]:
            print(*(f"{v:.9g}" for v in b), f"{s:.9g}")
        return
    import torch
    import torchvision

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{a.device}, {torch.get_num_threads()} threads, IoU {a.iou}")
    for n in [int(s) for s in a.sizes.split(",")]:
        boxes, scores = detector_like_boxes(n, n)
        b = torch.tensor(boxes, dtype=torch.float32, device=a.device)
        s = torch.tensor(scores, dtype=torch.float32, device=a.device)
        keep = torchvision.ops.nms(b, s, a.iou)  # warm-up
        reps = 1 if n >= 50000 else (3 if n >= 10000 else 20)
        times = []
        for _ in range(reps):
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            keep = torchvision.ops.nms(b, s, a.iou)
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"nms/{a.device}/{n}: median {times[len(times) // 2] * 1e3:.2f} ms over {reps}, kept {keep.numel()}")


if __name__ == "__main__":
    main()
