#!/usr/bin/env python3
"""Static performance facts of every kernel on sm_90 (H100/H200), without a GPU.

Compiles each kernels/*.cu with the pinned CUDA 13.0 nvcc to an sm_90 cubin
(`nvcc -cubin -arch=sm_90 -Xptxas -v`), disassembles it (cuobjdump -sass) and prints
per kernel: registers, spill bytes (stores + loads), static shared memory, theoretical
occupancy on an H100 at the kernel's launch block size, and SASS counts of HMMA
(tensor-core mma), LDSM (ldmatrix), LDGSTS (cp.async) and FFMA.

    scripts/sass_report.py [--check [--check-prefix=tc_conv_]] [--markdown] [FILE_SUBSTRING ...]

--check fails (exit 1) when a tensor-core conv/GEMM kernel (tc_conv_*) spills, or has
no HMMA inside a loop of its SASS (between a backward branch and its target): its
main loop.

Tools: KESTREL_NVCC (else the venv's nvcc), cuobjdump beside it (pip packages
nvidia-cuda-cuobjdump; 13.0 is not on PyPI, 13.2 reads 13.0's sm_90 cubins).
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H100 SXM (sm_90) per-SM limits.
SM_REGS = 65536
SM_SMEM = 228 * 1024  # bytes; each block also reserves 1 KiB
SM_WARPS = 64
SM_BLOCKS = 32
REG_UNIT = 256  # registers are allocated per warp in units of 256

# Threads per block each kernel is launched with (src/ops); others use 256
# (LaunchCfg::for_elems).
BLOCK = {"tc_conv_": 128, "tc_probe_": 32}


def block_size(name):
    for prefix, b in BLOCK.items():
        if name.startswith(prefix):
            return b
    return 256


def occupancy(regs, smem, threads):
    warps = (threads + 31) // 32
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // (smem + 1024) if smem else SM_BLOCKS
    by_warps = SM_WARPS // warps
    blocks = min(by_regs, by_smem, by_warps, SM_BLOCKS)
    return blocks * warps / SM_WARPS, blocks


def tools():
    nvcc = os.environ.get("KESTREL_NVCC")
    if not nvcc:
        venv = os.environ.get("KESTREL_VENV", os.path.join(ROOT, ".venv"))
        nvcc = os.path.join(venv, "lib/python3.11/site-packages/nvidia/cu13/bin/nvcc")
    cuobjdump = os.path.join(os.path.dirname(nvcc), "cuobjdump")
    for t in (nvcc, cuobjdump):
        if not os.path.isfile(t):
            sys.exit(f"sass_report: {t} not found (set KESTREL_NVCC; pip install nvidia-cuda-cuobjdump)")
    return nvcc, cuobjdump


def ptxas_info(stderr):
    """entry -> dict(regs, spill, smem) from -Xptxas -v output."""
    info, cur = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            info[cur] = {"regs": 0, "spill": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[cur]["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[cur]["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            info[cur]["smem"] = int(m.group(1))
    return info


def sass_counts(sass):
    """entry -> dict(HMMA, LDSM, LDGSTS, FFMA, loop_hmma) from cuobjdump -sass."""
    out, name, body = {}, None, []

    def flush():
        if name is None:
            return
        c = {k: 0 for k in ("HMMA", "LDSM", "LDGSTS", "FFMA")}
        insns = []  # (address, text)
        for line in body:
            im = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if im:
                insns.append((int(im.group(1), 16), im.group(2)))
        loops = []
        for addr, ins in insns:
            op = re.sub(r"^@!?U?P\w+\s+", "", ins.strip())
            base = op.split()[0].split(".")[0] if op else ""
            if base in c:
                c[base] += 1
            bm = re.search(r"\bBRA\s+(?:\S+,\s*)?`?\(?(0x[0-9a-f]+)", ins)
            if bm and int(bm.group(1), 16) <= addr:
                loops.append((int(bm.group(1), 16), addr))
        c["loop_hmma"] = sum(
            1 for addr, ins in insns if "HMMA" in ins and any(a <= addr <= b for a, b in loops)
        )
        out[name] = c

    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            flush()
            name, body = m.group(1), []
        elif name is not None:
            body.append(line)
    flush()
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    check, markdown = "--check" in sys.argv, "--markdown" in sys.argv
    # Which kernels --check holds to the rule (tests point it at an f32 kernel to see
    # the check fail).
    prefix = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--check-prefix=")), "tc_conv_")
    nvcc, cuobjdump = tools()
    kdir = os.path.join(ROOT, "kernels")
    files = sorted(f for f in os.listdir(kdir) if f.endswith(".cu"))
    if args:
        files = [f for f in files if any(a in f for a in args)]
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            cubin = os.path.join(tmp, f + ".cubin")
            r = subprocess.run(
                [nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-Xptxas", "-v", "-I", kdir, "-o", cubin,
                 os.path.join(kdir, f)],
                capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"nvcc failed on {f}:\n{r.stdout}{r.stderr}")
            info = ptxas_info(r.stdout + r.stderr)
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
            counts = sass_counts(sass)
            for entry in sorted(info):
                i, c = info[entry], counts.get(entry, {})
                occ, blocks = occupancy(i["regs"], i["smem"], block_size(entry))
                rows.append((f, entry, i["regs"], i["spill"], i["smem"], block_size(entry), occ, blocks,
                             c.get("HMMA", 0), c.get("loop_hmma", 0), c.get("LDSM", 0), c.get("LDGSTS", 0),
                             c.get("FFMA", 0)))
                if entry.startswith(prefix):
                    if i["spill"]:
                        failures.append(f"{entry}: {i['spill']} bytes of spills")
                    if c.get("loop_hmma", 0) == 0:
                        failures.append(f"{entry}: no HMMA in a loop")
    hdr = ("file", "kernel", "regs", "spill B", "smem B", "block", "occ H100", "blk/SM", "HMMA", "in loop", "LDSM",
           "LDGSTS", "FFMA")
    if markdown:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for r in rows:
            print("| " + " | ".join(f"{v:.0%}" if isinstance(v, float) else str(v) for v in r) + " |")
    else:
        fmt = "{:<16} {:<28} {:>4} {:>7} {:>7} {:>5} {:>8} {:>6} {:>5} {:>7} {:>5} {:>6} {:>5}"
        print(fmt.format(*hdr))
        for r in rows:
            print(fmt.format(*[f"{v:.0%}" if isinstance(v, float) else v for v in r]))
    if check and failures:
        print("\n".join(["FAIL:"] + failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
