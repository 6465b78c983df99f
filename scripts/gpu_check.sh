#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (no Rust there).
#
#   scripts/gpu_check.sh build   # here: build test + bench binaries with nvcc PTX,
#                                # stage them and the fixtures under .device/
#   then, with the device tool:  run(command="scripts/gpu_check.sh run", carry=[".device"])
#
# `run` executes every test binary with --include-ignored (so the CUDA parity tests
# run), then every bench's CUDA and CPU groups briefly, and prints a short table.
# Logs go to $OUT (or .device/out). Append the table to BENCH_RESULTS.md with the
# card and date.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.device

build() {
  local venv="${KESTREL_VENV:-$PWD/.venv}"
  local cu
  cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
  export KESTREL_NVCC="$cu/bin/nvcc" KESTREL_REQUIRE_NVCC=1
  rm -rf "$STAGE"; mkdir -p "$STAGE/bin" "$STAGE/bench"
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
  cargo test --release --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" "$STAGE/bin/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
  cargo bench --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["bench"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" "$STAGE/bench/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
  # The in-repo fixture set (tests/fixtures) is near the 64 MiB a call may carry: the ops part.
  mkdir -p "$STAGE/fixtures"; cp -r tests/fixtures/ops tests/fixtures/cocoeval "$STAGE/fixtures/"
  # Data-parallel check: the CLI with NCCL (libnccl is loaded at run time there).
  cargo build --release --features nccl --bin kestrel
  cp target/release/kestrel "$STAGE/kestrel-nccl"
  # NCCL gradient buckets on the device (communication stream + CUDA events): the
  # test exists only with the feature, so it replaces the empty default-build binary.
  cargo test --release --features nccl --no-run --test dist_nccl --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" "$STAGE/bin/dist_nccl"; done
  du -sh "$STAGE"
}

run() {
  local out="${OUT:-$STAGE/out}"; mkdir -p "$out"
  export KESTREL_FIXTURES="$PWD/$STAGE/fixtures"
  # One run id for every binary below: zz_emu_coverage counts only this run's records.
  export KESTREL_TEST_RUN="gpu-check-$$-$(date +%s)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt" || true
  local table="$out/table.txt"; : > "$table"
  for t in "$STAGE"/bin/*; do
    local name; name="$(basename "$t")"
    if "$t" --include-ignored --test-threads=1 > "$out/test-$name.log" 2>&1; then s=ok; else s=FAIL; fi
    printf '%-28s %-5s %s\n' "test:$name" "$s" "$(grep -E '^test result' "$out/test-$name.log" | tail -1)" >> "$table"
  done
  # A world of one over NCCL, end to end (launcher, rendezvous, NCCL id, bucketed
  # all-reduce, checkpoint, sharded evaluation); falls back to TCP, and says so, when
  # libnccl is absent.
  if MASTER_PORT=29531 KESTREL_DIST_TIMEOUT=120 "$STAGE/kestrel-nccl" train scripts/dist_world1.toml --gpus 1 \
      > "$out/dist-world1.log" 2>&1; then s=ok; else s=FAIL; fi
  printf '%-28s %-5s %s\n' "dist:world1" "$s" "$(grep -m1 -E 'collective' "$out/dist-world1.log")" >> "$table"
  for b in "$STAGE"/bench/*; do
    local name; name="$(basename "$b")"
    [ "$name" = tc_conv ] && continue  # timed below, beside torch
    "$b" --bench --warm-up-time 0.5 --measurement-time 2 cuda > "$out/bench-$name.log" 2>&1 || echo "bench $name failed" >> "$table"
    grep -E '^(\S+/cuda/\S+)|time:' "$out/bench-$name.log" | paste - - | awk '{print "bench:" $1, $3, $4, $5, $6, $7}' >> "$table" || true
  done
  # Tensor-core conv/linear per ResNet-50-FPN layer beside cuDNN/cuBLAS (bf16,
  # channels_last), as TFLOP/s and ratios (goal: each conv >= 0.70 of cuDNN).
  if [ -x "$STAGE/bench/tc_conv" ]; then
    "$STAGE/bench/tc_conv" > "$out/tc_kestrel.jsonl" 2> "$out/tc_kestrel.err" || echo "bench tc_conv failed" >> "$table"
    python3 scripts/bench_tc_torch.py > "$out/tc_torch.jsonl" 2> "$out/tc_torch.err" || echo "torch reference unavailable (see tc_torch.err)" >> "$table"
    python3 - "$out/tc_kestrel.jsonl" "$out/tc_torch.jsonl" >> "$table" <<'PY' || true
import json, sys
def load(p):
    try:
        return {r["layer"]: r for r in map(json.loads, filter(str.strip, open(p)))}
    except (OSError, ValueError):
        return {}
k, t = load(sys.argv[1]), load(sys.argv[2])
print(f"{'layer':<22} {'kestrel TF/s':>12} {'torch TF/s':>10} {'ratio':>6}")
for name, r in k.items():
    tt = t.get(name, {}).get("tflops")
    ratio = f"{r['tflops'] / tt:.2f}" if tt else "-"
    print(f"{name:<22} {r['tflops']:>12} {tt if tt else '-':>10} {ratio:>6}")
PY
  fi
  cat "$table"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
