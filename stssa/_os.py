"""Small operating-system helpers shared by the data, training and inference layers (no torch import)."""
from __future__ import annotations

import os
import re


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS allows (Linux >= 4.7:
    ``/proc/self/status``). Elsewhere ``os.umask`` is set and restored at once: it has no read-only form,
    and a file another thread creates in between gets mode 022's."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(r"^Umask:\s*([0-7]+)\s*$", f.read(), re.M)
        if m:
            return int(m.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
