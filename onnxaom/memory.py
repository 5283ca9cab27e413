"""How much memory this machine can give: the one place that asks the OS.

Used to refuse, before allocating, arrays that cannot fit (occurrence counts of many classes,
images resized to a large side) with an error that says what needs the memory, instead of a
``MemoryError`` traceback or the kernel's out-of-memory kill.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_bytes", "physical_bytes"]


def physical_bytes() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory a new allocation can use now, in bytes: Linux's ``MemAvailable`` (free memory plus
    caches the kernel can drop), else the physical RAM; None where neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_bytes()
