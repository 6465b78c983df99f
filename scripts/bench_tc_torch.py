#!/usr/bin/env python3
"""cuDNN / cuBLAS reference for benches/tc_conv.rs: every ResNet-50-FPN conv and
linear of scripts/resnet50_fpn_layers.txt with torch.nn.functional.conv2d / linear
in bf16, channels_last, on cuda:0. One JSON line per layer (ms, TFLOP/s)."""
import json
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("bench_tc_torch: no CUDA device")
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda:0")
here = os.path.dirname(os.path.abspath(__file__))
for line in open(os.path.join(here, "resnet50_fpn_layers.txt")):
    f = line.split()
    if not f or f[0].startswith("#"):
        continue
    if f[0] == "conv":
        n, cin, h, w, cout, k, s, p, d = map(int, f[2:])
        x = torch.randn(n, cin, h, w, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        wt = torch.randn(cout, cin, k, k, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        run = lambda: F.conv2d(x, wt, stride=s, padding=p, dilation=d)
        y = run()
        flops = 2.0 * n * cout * y.shape[2] * y.shape[3] * cin * k * k
    else:
        m, kk, nn = map(int, f[2:])
        x = torch.randn(m, kk, device=dev, dtype=torch.bfloat16)
        wt = torch.randn(nn, kk, device=dev, dtype=torch.bfloat16)
        run = lambda: F.linear(x, wt)
        flops = 2.0 * m * kk * nn
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 20
    a.record()
    for _ in range(iters):
        run()
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / iters
    print(json.dumps({"layer": f[1], "impl": "torch", "ms": round(ms, 4), "tflops": round(flops / (ms * 1e-3) / 1e12, 2)}))
