"""Host memory statistics, used by the CPU backend and by emulated devices (whose tensors are on the CPU)."""

from __future__ import annotations

from glmport.backends._emulation import _reset_rss_peak, _rss

from glmport.backend import MemoryStats


def host_memory_stats() -> MemoryStats:
    current, peak = _rss()
    return MemoryStats(allocated=current, peak=peak, reserved=None)


def reset_host_peak() -> None:
    _reset_rss_peak()
