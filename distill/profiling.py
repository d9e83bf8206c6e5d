"""Named ranges over the passes of a training step, inside the methods and the loop that run them.

`span(name)` is a `torch.profiler.record_function("distill/NAME")` range (visible in any torch.profiler trace,
e.g. bench/profile_step.py) and, while a `SpanTimer` is installed (bench/throughput.py), a wall-clock interval
with device syncs at both ends. Not installed, it costs one record_function (about a microsecond).

Names used: teacher, target, student (method forwards), d (a discriminator's forwards), backward, clip,
optimizer, callbacks (the loop).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

_timer: SpanTimer | None = None


class SpanTimer:
    """Seconds per span name, summed over every entry, and only for spans not nested in another."""

    def __init__(self, device: torch.device | None = None):
        self.sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0

    @contextlib.contextmanager
    def installed(self):
        global _timer
        previous, _timer = _timer, self
        try:
            yield self
        finally:
            _timer = previous


@contextlib.contextmanager
def span(name: str):
    with torch.profiler.record_function(f"distill/{name}"):
        timer = _timer
        if timer is None or timer.depth:
            yield
            return
        timer.sync()
        timer.depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timer.sync()
            timer.seconds[name] += time.perf_counter() - t0
            timer.depth -= 1
