"""Hub access fails fast: an unreachable endpoint switches the libraries to offline mode at once."""

from __future__ import annotations

import os
import socket
import time

import pytest

from moectl.common import hub
from moectl.data import lm, tokenizer
from moectl.config import from_dict
from moectl.common.errors import DataError


@pytest.fixture
def online_env(monkeypatch):
    """Pretend the user did not ask for offline mode, so the probe really runs."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_endpoint_goes_offline_fast(online_env):
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    assert hub.go_offline_if_unreachable(timeout=3) is False
    assert time.monotonic() - t0 < 3.5
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.is_offline()


def test_reachable_endpoint_stays_online(online_env):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.go_offline_if_unreachable(timeout=3) is True
    assert not hub.is_offline()


def test_unreachable_hub_dataset_and_tokenizer_fail_fast_with_advice(online_env):
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    cfg = from_dict({"data": {"source": "hub", "name": "wikitext", "config_name": "wikitext-2-raw-v1"}})
    t0 = time.monotonic()
    with pytest.raises(DataError, match="the Hugging Face Hub is unreachable .*data.source=files"):
        lm.load_raw(cfg.data)
    with pytest.raises(DataError, match="tokenizer.name='gpt2': the Hugging Face Hub is unreachable"):
        tokenizer.load_hub("gpt2")
    assert time.monotonic() - t0 < 15
