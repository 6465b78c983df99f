#!/usr/bin/env python3
"""Where `cargo test`'s run time goes: every test binary run on its own, timed.

Builds the test targets (`cargo test --no-run`, the same profile as `cargo test`),
then runs each binary as cargo would (from the repository root, `--test-threads=2`
unless given) and prints, sorted by wall time: wall seconds, CPU seconds (user +
sys of the binary and its threads) and their ratio. On a machine shared with other
builds the wall time is inflated by the load; the CPU seconds are not (much), and
CPU / 2 to CPU is the range of the wall time on 2 quiet cores. A failing binary is
reported, not hidden.

    python3 scripts/test_times.py                 # every test target
    python3 scripts/test_times.py model graphs    # only these targets
    python3 scripts/test_times.py --report-time   # also each test's time (libtest's
                                                  # unstable flag: RUSTC_BOOTSTRAP=1)
"""

import json
import os
import resource
import subprocess
import sys
import time


def executables(targets):
    cmd = ["cargo", "test", "--no-run", "--message-format=json"]
    for t in targets:
        cmd += ["--test", t]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout
    exes = []
    for line in out.splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
            exes.append((m["target"]["name"], m["executable"]))
    return exes


def main():
    args = sys.argv[1:]
    per_test = "--report-time" in args
    targets = [a for a in args if not a.startswith("--")]
    threads = os.environ.get("RUST_TEST_THREADS", "2")
    rows = []
    for name, exe in executables(targets):
        cmd = [exe, f"--test-threads={threads}"]
        env = dict(os.environ)
        if per_test:
            cmd += ["-Z", "unstable-options", "--report-time"]
            env["RUSTC_BOOTSTRAP"] = "1"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows.append((wall, cpu, name, p.returncode))
        print(f"{name:<28} wall {wall:8.1f} s  cpu {cpu:8.1f} s  rc {p.returncode}", flush=True)
        if per_test:
            for line in p.stdout.splitlines():
                if line.startswith("test ") and "<" in line:
                    print("    " + line)
    total_w = sum(r[0] for r in rows)
    total_c = sum(r[1] for r in rows)
    print(f"\n{'binary':<28} {'wall s':>8} {'share':>6} {'cpu s':>8} {'cpu/wall':>8}")
    for wall, cpu, name, rc in sorted(rows, reverse=True):
        flag = "" if rc == 0 else f"  FAILED rc {rc}"
        print(f"{name:<28} {wall:8.1f} {wall / total_w:6.1%} {cpu:8.1f} {cpu / max(wall, 1e-9):8.2f}{flag}")
    print(f"{'total':<28} {total_w:8.1f} {'':>6} {total_c:8.1f}  (load average {os.getloadavg()[0]:.1f})")
    sys.exit(1 if any(r[3] != 0 for r in rows) else 0)


if __name__ == "__main__":
    main()
