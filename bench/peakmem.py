"""Peak resident memory of one call, measured in a fresh child process (Linux only).

A benchmark script measures a provider by re-running itself as
``python SCRIPT --child JSON`` (see :func:`run_child`); the child builds the provider, warms it up
and reports :func:`peak_rss_above` of one call as a JSON line.  A fresh process per provider keeps
one provider's allocator caches out of another's figure, and glibc's mmap threshold is pinned
(``MALLOC_MMAP_THRESHOLD_``) so that freed buffers leave RSS and the peak follows the live tensors.
Used by layouts.py and train_step.py.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# Without a fixed threshold glibc raises it dynamically after large frees, and later buffers of
# that size come from the heap, whose freed pages stay resident.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def status_kb(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_above(fn: Callable[[], object]) -> int:
    """Bytes of peak RSS above the current RSS during one ``fn()`` (warm ``fn`` up first, so
    one-time allocations such as caches and optimizer state are in the baseline)."""
    gc.collect()
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fn()
    return (status_kb("VmHWM") - base) * 1024


def run_child(script: str | Path, spec: dict, timeout: float = 1800) -> dict | None:
    """Run ``python script --child json(spec)`` with the malloc settings above and return the last
    JSON object it prints on stdout, or None (with its stderr's tail printed) if it printed none."""
    env = dict(os.environ, **MALLOC_ENV)
    res = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(res.stderr[-2000:], file=sys.stderr)
    return None
