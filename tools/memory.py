"""Process memory for the benchmarks: resident set size now and at its peak, from /proc (Linux) or getrusage."""

from __future__ import annotations

import platform
import resource
from pathlib import Path


def status_mib(field: str) -> float | None:
    """A /proc/self/status line (VmRSS now, VmHWM peak since start or the last reset) in MiB; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(field + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS: VmHWM where readable, else getrusage's ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024
