"""The GPU's SM clock and power, sampled by nvidia-smi in the background while kernels are timed.

The Palu decode kernels are compute-bound and follow the SM clock, which the H200 lowers under its power cap, while
memory-bound dense decode does not slow down: every kernel timing carries the clock it ran at.
"""

from __future__ import annotations

import datetime
import shutil
import statistics
import subprocess
import threading
import time

SMI_QUERY = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
POWER_CAP_REASON = 0x4  # nvidia-smi's "SW power cap" throttle reason bit


def parse_smi_sample(line: str) -> tuple[float, float, float, int] | None:
    """One line of ``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits``: (unix time, SM MHz,
    watts, throttle reasons); None for lines that are not samples (errors, "[N/A]")."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1]), float(parts[2]), int(parts[3], 16)
    except ValueError:
        return None


class ClockMonitor:
    """SM clock and power sampled by nvidia-smi every ``period_ms`` in the background, for as long as the context
    is open; ``window(start, end)`` summarizes the samples taken between two ``time.time()`` stamps. Without
    nvidia-smi every summary is empty (the benchmark still runs)."""

    def __init__(self, period_ms: int = 50):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float, float, int]] = []
        self._process = None
        self._reader = None

    def __enter__(self) -> ClockMonitor:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits", "-lms",
                 str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            sample = parse_smi_sample(line)
            if sample is not None:
                self.samples.append(sample)

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._reader.join(timeout=1)

    def window(self, start: float, end: float) -> dict:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if not inside:
            return {}
        return {"sm_mhz": statistics.median(sample[1] for sample in inside),
                "watts": max(sample[2] for sample in inside),
                "power_capped": any(sample[3] & POWER_CAP_REASON for sample in inside)}


def timed_with_clock(fn, monitor: ClockMonitor) -> dict:
    """Median time of ``fn`` (do_bench) and the SM clock while it ran. nvidia-smi's samples arrive with a lag,
    so the window is read after a short wait."""
    from triton.testing import do_bench

    start = time.time()
    us = do_bench(fn, return_mode="median") * 1e3
    end = time.time()
    time.sleep(2.5 * monitor.period_ms / 1e3)
    return {"us": us, **monitor.window(start, end)}
