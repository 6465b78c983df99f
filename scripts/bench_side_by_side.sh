#!/usr/bin/env bash
# Kestrel beside torchvision on this machine, interleaved (A B A B ...) so that drift
# in a shared machine's load shows in both: `kestrel bench` and
# scripts/bench_torchvision.py (fasterrcnn_resnet50_fpn, random weights) alternate
# --pairs times, then the ratio (torchvision time / Kestrel time: above 1 means
# Kestrel is faster) of each pair, per stage and in total, is summarised as median
# and range. Not part of CI: it needs torch + torchvision, from $KESTREL_TORCH_VENV
# (a venv with both) or installed from PyPI into target/bench-venv (several GB).
#
#   scripts/bench_side_by_side.sh [--device cpu|cuda] [--batch 1,2] [--iters N]
#                                 [--pairs N] [--train] [--ops] [--threads N]
#                                 [--size HxW] [--flush-denormals]
#
# --ops also runs torch's conv2d / NMS / RoIAlign once, on the shapes of
# benches/conv.rs, detection.rs and roi_align.rs (compare with `cargo bench` output,
# criterion names), and on the CPU `kestrel bench --ops`: every ResNet-50-FPN conv
# shape beside the square GEMM of the same FLOPs, and one SGD step's time.
# --size (default 800x1216) is for short smoke runs; the figures are at 800x1216.
# Results land in target/side_by_side/ (kestrel.N.json, torchvision.N.json, *.txt,
# summary.txt, which starts with the CPU model and its vector flags).
set -euo pipefail

cd "$(dirname "$0")/.."
DEVICE=cpu BATCH=1 ITERS=3 PAIRS=3 TRAIN="" OPS="" THREADS=0 SIZE=800x1216 FLUSH=""
while [ $# -gt 0 ]; do
    case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --train) TRAIN=--train; shift ;;
    --ops) OPS=--ops; shift ;;
    --flush-denormals) FLUSH=--flush-denormals; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
VENV=${KESTREL_TORCH_VENV:-target/bench-venv}
OUT=target/side_by_side
mkdir -p "$OUT"

if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    avail_kb=$(df -Pk target | awk 'NR==2 {print $4}')
    if [ "$avail_kb" -lt $((8 * 1024 * 1024)) ]; then
        echo "less than 8 GiB free under target/: not installing torch (PyPI's wheels with their CUDA libraries take several GB)" >&2
        exit 1
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --progress-bar off torch torchvision || {
        echo "pip install torch torchvision failed: no side-by-side run" >&2
        exit 1
    }
fi

# Same thread count for both: rayon and torch default to the number of cores.
if [ "$THREADS" -gt 0 ]; then
    export RAYON_NUM_THREADS=$THREADS
fi
DEV_ARG=$DEVICE
[ "$DEVICE" = cuda ] && DEV_ARG=cuda:0

CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8)$' | xargs)
MACHINE="$(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) (family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | xargs) model $(grep -m1 '^model\s*:' /proc/cpuinfo | cut -d: -f2 | xargs)), flags: $CPU_FLAGS, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
echo "== machine: $MACHINE"
# KESTREL_BENCH_NO_BUILD=1 uses the binary already in target/release as it is.
[ -n "${KESTREL_BENCH_NO_BUILD:-}" ] || cargo build --release --bin kestrel
rm -f "$OUT"/kestrel.*.json "$OUT"/torchvision.*.json
for i in $(seq 1 "$PAIRS"); do
    echo "== pair $i/$PAIRS: kestrel bench (load $(cut -d' ' -f1-3 /proc/loadavg))"
    ./target/release/kestrel bench --device "$DEV_ARG" --batch "$BATCH" --size "$SIZE" --iters "$ITERS" $TRAIN $FLUSH \
        --json "$OUT/kestrel.$i.json" | tee "$OUT/kestrel.$i.txt"
    echo "== pair $i/$PAIRS: torchvision (load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$VENV/bin/python" scripts/bench_torchvision.py --model --device "$DEVICE" --threads "$THREADS" \
        --batch "$BATCH" --size "$SIZE" --iters "$ITERS" $TRAIN $FLUSH --json "$OUT/torchvision.$i.json" | tee "$OUT/torchvision.$i.txt"
done
if [ -n "$OPS" ]; then
    echo "== torch ops"
    "$VENV/bin/python" scripts/bench_torchvision.py --ops --device "$DEVICE" --threads "$THREADS" \
        --json "$OUT/torchvision_ops.json" | tee "$OUT/torchvision_ops.txt"
    if [ "$DEVICE" = cpu ]; then
        echo "== kestrel ops: conv vs square GEMM per layer shape, SGD step (load $(cut -d' ' -f1-3 /proc/loadavg))"
        ./target/release/kestrel bench --device cpu --no-infer --ops $TRAIN --iters "$ITERS" | tee "$OUT/kestrel_ops.txt"
    fi
fi
echo "== ratios (torchvision ms / kestrel ms per pair; > 1: kestrel faster), load now $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" "$PAIRS" "$MACHINE" <<'EOF' | tee "$OUT/summary.txt"
import json, statistics, sys
out, pairs = sys.argv[1], int(sys.argv[2])
print(f"machine: {sys.argv[3]}")
import os
# Complete pairs only (a run cut short still summarises the pairs it finished).
runs = [(json.load(open(f"{out}/kestrel.{i}.json")), json.load(open(f"{out}/torchvision.{i}.json")))
        for i in range(1, pairs + 1)
        if os.path.exists(f"{out}/kestrel.{i}.json") and os.path.exists(f"{out}/torchvision.{i}.json")]
pairs = len(runs)
def key(r):
    return (r["mode"], r["batch"])
def fmt(v):
    return f"{statistics.median(v):8.1f} [{min(v):.1f}-{max(v):.1f}]"
print(f"{pairs} interleaved pairs; ms as median [min-max] over pairs; ratio per pair")
for mode, batch in [key(r) for r in runs[0][0]["results"]]:
    rows = []
    for k, t in runs:
        kr = next(r for r in k["results"] if key(r) == (mode, batch))
        tr = next((r for r in t.get("results", []) if key(r) == (mode, batch)), None)
        if tr:
            rows.append((kr, tr))
    if not rows:
        continue
    print(f"{mode} b{batch}:")
    order = ["transform", "backbone", "fpn", "rpn_head", "proposals", "roi_heads",
             "postprocess", "backward", "optimizer"]
    names = sorted(rows[0][0]["stages_ms"], key=lambda s: order.index(s) if s in order else 99)
    for s in names + ["total"]:
        get = lambda r: r["total_ms"] if s == "total" else r["stages_ms"].get(s)
        ks = [get(kr) for kr, _ in rows]
        ts = [get(tr) for _, tr in rows]
        if None in ts or min(ks) <= 0:
            continue
        ratios = [t / k for k, t in zip(ks, ts)]
        print(f"  {s:<12} kestrel {fmt(ks)} ms  torchvision {fmt(ts)} ms  "
              f"ratio median {statistics.median(ratios):5.2f} range {min(ratios):.2f}-{max(ratios):.2f}")
    kp = [kr.get("peak_mib") for kr, _ in rows]
    tp = [tr.get("peak_mib") for _, tr in rows]
    if all(kp) and all(tp):
        print(f"  {'peak MiB':<12} kestrel {max(kp):8.0f}  torchvision {max(tp):8.0f}")
EOF
