"""Memory/time profiling: peak and average RSS (background sampler + kernel high-water mark), CUDA peak."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

_STATUS = Path("/proc/self/status")
_LIBC: Any = None
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs). False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory(device: torch.device | None = None) -> None:
    """Give freed host memory back to the OS (glibc ``malloc_trim``) between prefill chunks.

    Chunked prefill frees and reallocates activation buffers of growing sizes (the dequantized history
    of each layer); glibc keeps those holes in its heap, so RSS would track the sum of past chunks
    instead of what is live. No-op off glibc and on CUDA (PyTorch's caching allocator reuses blocks).
    """
    global _LIBC
    if device is not None and device.type != "cpu":
        return
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class MemoryProfiler:
    """Context manager: samples RSS every ``interval_s`` in a thread; reads the exact peak where possible.

    Result keys: ``peak_rss_bytes``, ``avg_rss_bytes``, ``start_rss_bytes`` and, on CUDA,
    ``cuda_max_allocated_bytes`` (peak of ``torch.cuda.max_memory_allocated`` inside the block).
    """

    def __init__(self, interval_s: float = 0.005, device: torch.device | None = None) -> None:
        self.interval_s = interval_s
        self.device = device
        self.result: dict[str, Any] = {}
        self._proc = psutil.Process()

    def __enter__(self) -> MemoryProfiler:
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._exact = _reset_hwm()
        self.start_rss = self._proc.memory_info().rss
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = self._proc.memory_info().rss
        samples = self._samples + [end]
        peak = max(samples)
        if self._exact:
            peak = max(peak, _hwm_bytes() or 0)
        self.result = {
            "peak_rss_bytes": peak,
            "avg_rss_bytes": int(sum(samples) / len(samples)),
            "start_rss_bytes": self.start_rss,
        }
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.result["cuda_start_allocated_bytes"] = self._cuda_start


class Timer:
    """``with Timer() as t: ...; t.s`` — wall seconds (synchronises CUDA when given a cuda device)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.s = 0.0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.s = time.perf_counter() - self._t0
