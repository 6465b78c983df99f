#!/bin/bash
# CPU time of `kestrel demo`'s training phase, for interleaved f32 / bf16 comparisons
# on a loaded machine (where wall time says little: the process gets a varying share
# of the cores). Reads the process's utime + stime (/proc/PID/stat) when training
# starts ("[2/4]") and when it ends ("s per iteration"), then stops the demo (the
# evaluation is not timed).
#
# usage: scripts/demo_train_cpu_time.sh BINARY PRECISION ITERS TAG [DEMO FLAGS...]
# (extra flags go to `kestrel demo`, e.g. --flush-denormals)
# prints: TAG PRECISION wall_train_s=... cpu_train_s=... load=... and the last logged losses
# e.g. A B A B:
#   for r in 1 2; do scripts/demo_train_cpu_time.sh target/debug/kestrel f32 30 r$r-f32
#                    scripts/demo_train_cpu_time.sh target/debug/kestrel bf16 30 r$r-bf16; done
set -u
bin=$1; prec=$2; iters=$3; tag=$4; shift 4
log=${TMPDIR:-/tmp}/demo-cpu-time-$tag.log
out=${TMPDIR:-/tmp}/demo-cpu-time-$tag
rm -rf "$out"
"$bin" demo --out "$out" --device cpu --precision "$prec" --iters "$iters" "$@" > "$log" 2>&1 &
pid=$!
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' /proc/$pid/stat; }
c0=""; c1=""
while kill -0 $pid 2>/dev/null; do
  if [ -z "$c0" ] && grep -q '^\[2/4\]' "$log"; then c0=$(cpu); fi
  if grep -q 's per iteration' "$log"; then c1=$(cpu); kill $pid; break; fi
  sleep 0.2
done
wait $pid 2>/dev/null
wall=$(grep 's per iteration' "$log" | sed 's/^ *\([0-9.]*\) s.*/\1/')
loss=$(grep "Iter \[$iters/$iters\]" "$log" | sed 's/.*loss_objectness/loss_objectness/')
echo "$tag $prec wall_train_s=$wall cpu_train_s=$(echo "($c1 - $c0) / $tck" | bc -l | cut -c1-6) load=$(cut -d' ' -f1 /proc/loadavg) $loss"
