#!/usr/bin/env python3
"""torchvision's side of Kestrel's benches, on the same shapes and inputs.

Not part of CI: run it through scripts/bench_side_by_side.sh (own venv under target/),
or in any venv with torch and torchvision:

    python scripts/bench_torchvision.py [--device cpu|cuda] [--threads N]
        [--model] [--ops] [--batch 1,2] [--size 800x1216] [--iters 3] [--warmup 1]
        [--train] [--json out.json]

--model: fasterrcnn_resnet50_fpn (v1) with random weights (weights=None,
weights_backbone=None), timed per stage like `kestrel bench` (transform, backbone, fpn,
rpn_head, proposals, roi_heads, postprocess; training: transform .. roi_heads with the
losses, backward, optimizer), the same table format. By default the backbone uses
FrozenBatchNorm2d with all five stages trainable, as Kestrel's resnet50_fpn does (the
plain `fasterrcnn_resnet50_fpn(weights=None)` would build BatchNorm2d; `--bn batchnorm`
times that instead).

--ops: conv2d on the ResNet-50 + FPN layer shapes of benches/conv.rs (ms and GFLOP/s,
with a 1024^3 matmul as the reference), NMS on benches/detection.rs's boxes (same
generator, IoU 0.7), and RoIAlign / MultiScaleRoIAlign as benches/roi_align.rs (1000
RoIs x 256 ch x 7x7 at 800x1216, the same boxes). Names match the criterion benches.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torchvision_nms import Rng, detector_like_boxes  # noqa: E402

INFERENCE_STAGES = ["transform", "backbone", "fpn", "rpn_head", "proposals", "roi_heads", "postprocess"]
TRAINING_STAGES = ["transform", "backbone", "fpn", "rpn_head", "proposals", "roi_heads", "backward", "optimizer"]

# benches/conv.rs LAYERS: name, cin, cout, k, stride, (h, w); padding k // 2.
CONV_LAYERS = [
    ("stem_7x7s2_3-64_800x1216", 3, 64, 7, 2, (800, 1216)),
    ("layer1_1x1_64-64_200x304", 64, 64, 1, 1, (200, 304)),
    ("layer1_3x3_64-64_200x304", 64, 64, 3, 1, (200, 304)),
    ("layer1_1x1_64-256_200x304", 64, 256, 1, 1, (200, 304)),
    ("layer2_1x1_512-128_100x152", 512, 128, 1, 1, (100, 152)),
    ("layer2_3x3_128-128_100x152", 128, 128, 3, 1, (100, 152)),
    ("layer2_1x1_128-512_100x152", 128, 512, 1, 1, (100, 152)),
    ("layer3_1x1_1024-256_50x76", 1024, 256, 1, 1, (50, 76)),
    ("layer3_3x3_256-256_50x76", 256, 256, 3, 1, (50, 76)),
    ("layer3_1x1_256-1024_50x76", 256, 1024, 1, 1, (50, 76)),
    ("layer4_1x1_2048-512_25x38", 2048, 512, 1, 1, (25, 38)),
    ("layer4_3x3_512-512_25x38", 512, 512, 3, 1, (25, 38)),
    ("layer4_1x1_512-2048_25x38", 512, 2048, 1, 1, (25, 38)),
    ("fpn_lateral_1x1_2048-256_25x38", 2048, 256, 1, 1, (25, 38)),
    ("fpn_lateral_1x1_256-256_200x304", 256, 256, 1, 1, (200, 304)),
    ("fpn_out_3x3_256-256_200x304", 256, 256, 3, 1, (200, 304)),
]


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(torch, device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(torch, device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Laps:
    """Cuts a pass into stages, synchronising the device at each cut."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        sync(torch, device)
        self.last = time.perf_counter()
        self.times = []

    def lap(self, name):
        sync(self.torch, self.device)
        now = time.perf_counter()
        self.times.append((name, now - self.last))
        self.last = now


def build_model(torch, torchvision, bn):
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    if bn == "batchnorm":
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(_resnet_fpn_extractor(body, 5), num_classes=91)


def detect_profiled(torch, model, images, device):
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    laps = Laps(torch, device)
    with torch.no_grad():
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        il, _ = model.transform(images, None)
        laps.lap("transform")
        body = model.backbone.body(il.tensors)
        laps.lap("backbone")
        features = model.backbone.fpn(body)
        del body
        laps.lap("fpn")
        rpn = model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        laps.lap("rpn_head")
        anchors = rpn.anchor_generator(il, feats)
        num_images = len(anchors)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, il.image_sizes, per_level)
        laps.lap("proposals")
        rh = model.roi_heads
        x = rh.box_roi_pool(features, boxes, il.image_sizes)
        x = rh.box_head(x)
        logits, regs = rh.box_predictor(x)
        laps.lap("roi_heads")
        b, s, l = rh.postprocess_detections(logits, regs, boxes, il.image_sizes)
        dets = [{"boxes": bb, "scores": ss, "labels": ll} for bb, ss, ll in zip(b, s, l)]
        dets = model.transform.postprocess(dets, il.image_sizes, original_sizes)
        laps.lap("postprocess")
    return laps.times


def train_step_profiled(torch, model, images, targets, opt, device):
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    laps = Laps(torch, device)
    il, targets = model.transform(images, targets)
    laps.lap("transform")
    body = model.backbone.body(il.tensors)
    laps.lap("backbone")
    features = model.backbone.fpn(body)
    laps.lap("fpn")
    rpn = model.rpn
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    laps.lap("rpn_head")
    anchors = rpn.anchor_generator(il, feats)
    num_images = len(anchors)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness, il.image_sizes, per_level)
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    reg_targets = rpn.box_coder.encode(matched, anchors)
    loss_obj, loss_rpn_box = rpn.compute_loss(objectness, deltas, labels, reg_targets)
    laps.lap("proposals")
    _, roi_losses = model.roi_heads(features, boxes, il.image_sizes, targets)
    loss = loss_obj + loss_rpn_box + roi_losses["loss_classifier"] + roi_losses["loss_box_reg"]
    laps.lap("roi_heads")
    loss.backward()
    laps.lap("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    laps.lap("optimizer")
    return laps.times


def synthetic_targets(torch, n, h, w, device):
    """Four boxes per image, sides 32..400 px, labels 1..90 (seeded like kestrel bench)."""
    r = Rng(0 ^ 0x7A11)
    out = []
    for _ in range(n):
        boxes, labels = [], []
        for _ in range(4):
            bw = r.range(32.0, min(400.0, w - 1.0))
            bh = r.range(32.0, min(400.0, h - 1.0))
            x1, y1 = r.range(0.0, w - bw), r.range(0.0, h - bh)
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(1 + r.below(90))
        out.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
            "labels": torch.tensor(labels, dtype=torch.int64, device=device),
        })
    return out


def summarize(mode, batch, runs, peak):
    names = [n for n, _ in runs[0]]
    stages = {n: statistics.median(r[i][1] * 1e3 for r in runs) for i, n in enumerate(names)}
    total = statistics.median(sum(t for _, t in r) * 1e3 for r in runs)
    return {"mode": mode, "batch": batch, "stages_ms": stages, "total_ms": total,
            "images_per_s": batch * 1e3 / total, "peak_mib": peak}


def repeat(label, warmup, iters, f):
    runs = []
    for i in range(warmup + iters):
        t = f()
        kind = "warm-up" if i < warmup else "timed"
        print(f"  {label} {kind} {i + 1}: {sum(x for _, x in t) * 1e3:.0f} ms", file=sys.stderr)
        if i >= warmup:
            runs.append(t)
    return runs


def print_table(rows):
    stages = []
    for s in INFERENCE_STAGES + TRAINING_STAGES:
        if s not in stages and any(s in r["stages_ms"] for r in rows):
            stages.append(s)
    print(f"{'ms':<14}" + "".join(f" {r['mode'] + ' b' + str(r['batch']):>12}" for r in rows))
    for s in stages:
        cells = [f" {r['stages_ms'][s]:>12.1f}" if s in r["stages_ms"] else f" {'-':>12}" for r in rows]
        print(f"{s:<14}" + "".join(cells))
    print(f"{'total':<14}" + "".join(f" {r['total_ms']:>12.1f}" for r in rows))
    print(f"{'images/s':<14}" + "".join(f" {r['images_per_s']:>12.3f}" for r in rows))
    print(f"{'peak MiB':<14}" + "".join(
        f" {r['peak_mib']:>12.0f}" if r["peak_mib"] is not None else f" {'n/a':>12}" for r in rows))


def bench_model(torch, torchvision, a):
    h, w = (int(v) for v in a.size.lower().split("x"))
    model = build_model(torch, torchvision, a.bn).to(a.device)
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in a.batch.split(",")]
    images = [torch.rand(3, h, w, generator=g).to(a.device) for _ in range(max(batches))]
    targets = synthetic_targets(torch, max(batches), h, w, a.device)
    rows = []
    if not a.no_infer:
        model.eval()
        for b in batches:
            tracks = reset_peak(torch, a.device)
            runs = repeat(f"infer b{b}", a.warmup, a.iters,
                          lambda: detect_profiled(torch, model, images[:b], a.device))
            rows.append(summarize("infer", b, runs, peak_mib(torch, a.device) if tracks else None))
    if a.train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        for b in batches:
            tracks = reset_peak(torch, a.device)
            runs = repeat(f"train b{b}", a.warmup, a.iters,
                          lambda: train_step_profiled(torch, model, images[:b], targets[:b], opt, a.device))
            rows.append(summarize("train", b, runs, peak_mib(torch, a.device) if tracks else None))
    print(f"torchvision bench: fasterrcnn_resnet50_fpn (random weights, {a.bn} BN), input {h}x{w}, "
          f"device {a.device} ({torch.get_num_threads()} CPU threads), warm-up {a.warmup}, median of {a.iters}")
    print_table(rows)
    print("peak memory: " + ("torch.cuda.max_memory_allocated per column" if a.device.startswith("cuda")
                             else "peak RSS of the process (VmHWM, reset per column)"))
    return rows


def time_it(torch, device, f, reps, warmup=1):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        sync(torch, device)
        t = time.perf_counter()
        f()
        sync(torch, device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def roi_boxes(seed, n=1000, h=800.0, w=1216.0):
    """benches/roi_align.rs `boxes`: sides log-uniform 8..600, clipped to the image."""
    r = Rng(seed)
    out = []
    for _ in range(n):
        side = 8.0 * 75.0 ** r.uniform()
        bw, bh = side * r.range(0.5, 2.0), side
        x1, y1 = r.range(0.0, w - 1.0), r.range(0.0, h - 1.0)
        out.append([x1, y1, min(x1 + bw, w), min(y1 + bh, h)])
    return out


def bench_ops(torch, torchvision, a):
    import torch.nn.functional as F
    from collections import OrderedDict

    dev = a.device
    name_dev = "cuda" if dev.startswith("cuda") else "cpu"
    res = {}
    print(f"\nops on {dev} ({torch.get_num_threads()} threads): median ms")
    x = torch.randn(1024, 1024, device=dev)
    y = torch.randn(1024, 1024, device=dev)
    ms = time_it(torch, dev, lambda: x @ y, a.op_reps)
    gemm_gflops = 2 * 1024**3 / (ms * 1e-3) / 1e9
    res[f"gemm/{name_dev}/1024"] = ms
    print(f"{'gemm/' + name_dev + '/1024':<48} {ms:>10.2f} ms {gemm_gflops:>8.1f} GFLOP/s")
    with torch.no_grad():
        for name, cin, cout, k, s, (h, w) in CONV_LAYERS:
            inp = torch.randn(1, cin, h, w, device=dev)
            wt = torch.randn(cout, cin, k, k, device=dev)
            ms = time_it(torch, dev, lambda: F.conv2d(inp, wt, stride=s, padding=k // 2), a.op_reps)
            oh, ow = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
            gf = 2 * cout * oh * ow * cin * k * k / (ms * 1e-3) / 1e9
            key = f"conv2d/{name_dev}/{name}"
            res[key] = ms
            print(f"{key:<48} {ms:>10.2f} ms {gf:>8.1f} GFLOP/s ({gf / gemm_gflops:.0%} of gemm)")
        for n in [1000, 5000, 20000, 100000]:
            b, sc = detector_like_boxes(n, n)
            bt = torch.tensor(b, dtype=torch.float32, device=dev)
            st = torch.tensor(sc, dtype=torch.float32, device=dev)
            reps = 1 if n >= 50000 else (3 if n >= 10000 else a.op_reps)
            ms = time_it(torch, dev, lambda: torchvision.ops.nms(bt, st, 0.7), reps)
            key = f"nms/{name_dev}/{n}"
            res[key] = ms
            print(f"{key:<48} {ms:>10.2f} ms")
    boxes = torch.tensor(roi_boxes(1), dtype=torch.float32, device=dev)
    rois = torch.cat([torch.zeros(1000, 1, device=dev), boxes], 1)
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38)]
    feats = [torch.rand(1, 256, h, w, device=dev) * 2 - 1 for h, w in sizes]
    p2 = feats[0].clone().requires_grad_(True)
    gy = torch.full((1000, 256, 7, 7), 0.5, device=dev)
    ra = torchvision.ops.roi_align
    with torch.no_grad():
        fwd = time_it(torch, dev, lambda: ra(feats[0], rois, (7, 7), 0.25, 2, False), a.op_reps)

    def fwd_bwd():
        y = ra(p2, rois, (7, 7), 0.25, 2, False)
        y.backward(gy)
        p2.grad = None

    fb = time_it(torch, dev, fwd_bwd, a.op_reps)
    ms_pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    fdict = OrderedDict((str(i), f) for i, f in enumerate(feats))
    with torch.no_grad():
        msf = time_it(torch, dev, lambda: ms_pool(fdict, [boxes], [(800, 1216)]), a.op_reps)
    gfeats = OrderedDict((str(i), f.clone().requires_grad_(True)) for i, f in enumerate(feats))

    def ms_fwd_bwd():
        y = ms_pool(gfeats, [boxes], [(800, 1216)])
        y.backward(gy)
        for f in gfeats.values():
            f.grad = None

    msfb = time_it(torch, dev, ms_fwd_bwd, a.op_reps)
    for key, ms in [
        (f"roi_align/{name_dev}/fwd_1000x256x7x7_p2", fwd),
        (f"roi_align/{name_dev}/bwd_1000x256x7x7_p2", fb - fwd),
        (f"roi_align/{name_dev}/fwd_bwd_1000x256x7x7_p2", fb),
        (f"multiscale_roi_align/{name_dev}/fwd_1000x256x7x7_p2-p5", msf),
        (f"multiscale_roi_align/{name_dev}/bwd_1000x256x7x7_p2-p5", msfb - msf),
        (f"multiscale_roi_align/{name_dev}/fwd_bwd_1000x256x7x7_p2-p5", msfb),
    ]:
        res[key] = ms
        note = " (fwd+bwd minus fwd)" if "/bwd_" in key else ""
        print(f"{key:<48} {ms:>10.2f} ms{note}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--size", default="800x1216")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--bn", choices=["frozen", "batchnorm"], default="frozen")
    ap.add_argument("--op-reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--flush-denormals", action="store_true",
                    help="torch.set_flush_denormal(True), as kestrel bench --flush-denormals")
    a = ap.parse_args()
    if not (a.model or a.ops):
        a.model = True
    import torch
    import torchvision

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.flush_denormals and not torch.set_flush_denormal(True):
        sys.exit("torch.set_flush_denormal(True) is not supported on this CPU")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{a.device}, {torch.get_num_threads()} threads")
    doc = {"impl": "torchvision", "torch": torch.__version__, "torchvision": torchvision.__version__,
           "device": a.device, "threads": torch.get_num_threads(), "size": a.size,
           "warmup": a.warmup, "iters": a.iters}
    if a.model:
        doc["results"] = bench_model(torch, torchvision, a)
    if a.ops:
        doc["ops_ms"] = bench_ops(torch, torchvision, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
