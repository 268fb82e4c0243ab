"""The device's measured peaks, once per run: a large matmul's rate and a large copy's
bandwidth, the yardsticks of each case's fraction of peak."""
from __future__ import annotations

import time

import torch


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def measure_peaks(device: torch.device) -> dict:
    """{"matmul_tflops": {dtype name: TFLOP/s}, "copy_gbps": GB/s (read + write)}.

    GPU: 8192^3 matmuls in bf16 and fp32 (TF32 as torch's setting has it) and a 1 GiB copy;
    CPU: a 1024^3 fp32 matmul and a 256 MiB copy (sizes that take a fraction of a second)."""
    if device.type == "cuda":
        n, dtypes, copy_bytes, repeats = 8192, (torch.bfloat16, torch.float32), 2 ** 30, 10
    else:
        n, dtypes, copy_bytes, repeats = 1024, (torch.float32,), 2 ** 28, 5
    rates = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _median_seconds(lambda: a @ b, device, repeats)
        rates[str(dtype).split(".")[1]] = 2 * n ** 3 / seconds / 1e12
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return {"matmul_tflops": rates, "copy_gbps": 2 * copy_bytes / seconds / 1e9}
