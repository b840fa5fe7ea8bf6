"""Hugging Face Hub access that fails fast when the Hub cannot be reached.

Left alone, `datasets` and `huggingface_hub` retry an unreachable Hub for half a minute.
`go_offline_if_unreachable()` probes the endpoint once with a short timeout; if it does not
answer, it switches both libraries to offline mode, so cached datasets and tokenizers still
load and anything else fails at once with a message we can turn into advice.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

UNREACHABLE = "the Hugging Face Hub is unreachable (offline?) and it is not in the local cache"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """True when the Hub is usable; otherwise switch the libraries to offline mode and return False."""
    if is_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        pass
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return False
