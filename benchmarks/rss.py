"""Peak resident memory of a process, sampled every 2 ms in a thread (psutil): the benchmarks' CPU memory measure."""
from __future__ import annotations

import threading
import time


class PeakRSS:
    """``with PeakRSS(pid) as rss: ...`` -> ``rss.start``, ``rss.peak``, ``rss.end`` in bytes (this process when
    ``pid`` is None, e.g. a ComfyUI server's otherwise)."""

    def __init__(self, pid: int | None = None):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.end = self.proc.memory_info().rss
