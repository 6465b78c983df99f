#!/usr/bin/env bash
# Kestrel beside torchvision on this machine, one after the other, same input sizes:
# `kestrel bench` and scripts/bench_torchvision.py (fasterrcnn_resnet50_fpn, random
# weights), then the ratios (torchvision time / Kestrel time: above 1 means Kestrel is
# faster). Not part of CI: it installs torch + torchvision from PyPI into its own venv
# under target/ (several GB with the CUDA libraries PyPI's torch wheels bring).
#
#   scripts/bench_side_by_side.sh [--device cpu|cuda] [--batch 1,2] [--iters N]
#                                 [--train] [--ops] [--threads N]
#
# --ops also runs torch's conv2d / NMS / RoIAlign on the shapes of benches/conv.rs,
# detection.rs and roi_align.rs; compare with `cargo bench` output (criterion names).
# Results land in target/side_by_side/ (kestrel.json, torchvision.json, *.txt).
set -euo pipefail

cd "$(dirname "$0")/.."
DEVICE=cpu BATCH=1 ITERS=3 TRAIN="" OPS="" THREADS=0
while [ $# -gt 0 ]; do
    case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --train) TRAIN=--train; shift ;;
    --ops) OPS=--ops; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
VENV=target/bench-venv
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

echo "== machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
echo "== kestrel bench"
cargo build --release --bin kestrel
./target/release/kestrel bench --device "$DEV_ARG" --batch "$BATCH" --iters "$ITERS" $TRAIN \
    --json "$OUT/kestrel.json" | tee "$OUT/kestrel.txt"
echo "== torchvision"
"$VENV/bin/python" scripts/bench_torchvision.py --model $OPS --device "$DEVICE" --threads "$THREADS" \
    --batch "$BATCH" --iters "$ITERS" $TRAIN --json "$OUT/torchvision.json" | tee "$OUT/torchvision.txt"
echo "== ratios (torchvision ms / kestrel ms; > 1: kestrel faster), load now $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT/kestrel.json" "$OUT/torchvision.json" <<'EOF'
import json, sys
k, t = (json.load(open(p)) for p in sys.argv[1:3])
tv = {(r["mode"], r["batch"]): r for r in t.get("results", [])}
for r in k["results"]:
    o = tv.get((r["mode"], r["batch"]))
    if not o:
        continue
    print(f"{r['mode']} b{r['batch']}:")
    for s, ms in r["stages_ms"].items():
        if s in o["stages_ms"] and ms > 0:
            print(f"  {s:<12} kestrel {ms:>10.1f} ms  torchvision {o['stages_ms'][s]:>10.1f} ms  ratio {o['stages_ms'][s] / ms:6.2f}")
    print(f"  {'total':<12} kestrel {r['total_ms']:>10.1f} ms  torchvision {o['total_ms']:>10.1f} ms  ratio {o['total_ms'] / r['total_ms']:6.2f}")
    if r.get("peak_mib") and o.get("peak_mib"):
        print(f"  {'peak MiB':<12} kestrel {r['peak_mib']:>10.0f}     torchvision {o['peak_mib']:>10.0f}")
EOF
