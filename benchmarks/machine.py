"""What the benchmark's machine is and can do: its name, native bf16, and its float32 matrix-multiply peak."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time

import torch


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether matrix products in bf16 run natively, and the evidence."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx") or f == "avx512f")
    ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and any("bf16" in f or f.startswith("amx") for f in flags)
    return ok, "CPU flags: " + (", ".join(flags) if flags else "no avx512_bf16/amx_bf16 (bf16 is emulated)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of the fastest square matrix product among a few sizes (median of repeats)."""
    best = 0.0
    sizes = (256, 512) if quick else ((1024, 2048) if device.type == "cpu" else (4096, 8192))
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        synchronize(device)
        times = []
        for _ in range(3 if quick else 6):
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best
