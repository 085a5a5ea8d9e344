"""Is the Hugging Face Hub reachable? Asked once, answered in 3 s, so offline runs fail fast."""

from __future__ import annotations

import functools
import os
import socket


def offline_mode() -> bool:
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def online() -> bool:
    if offline_mode():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False
