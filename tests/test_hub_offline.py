"""An unreachable Hugging Face Hub: one probe request, then offline mode, then the offline
hint - no retries. The network failure is simulated at the socket level (DNS), which is how
the Hub fails on a machine without access."""

from __future__ import annotations

import errno
import socket
import sys
import types

import pytest

from masksae.errors import CorpusError, ModelError
from masksae.hub_access import is_network_error


@pytest.fixture()
def no_network(monkeypatch):
    """Online mode (the test session runs offline), and every DNS lookup fails; returns the
    list of (host, offline mode on at the time) of each lookup."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    lookups: list[tuple[str, bool]] = []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append((str(host), bool(constants.HF_HUB_OFFLINE)))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_unreachable_hub_fails_fast_for_a_model(no_network, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from masksae.models import load_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelError) as info:
        load_model("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "the Hugging Face Hub is unreachable (ConnectError" in message
    assert "not in the local cache (offline? use bundled:smollm2-135m" in message
    # only the probe request went to the network (huggingface_hub may look the host up twice
    # for it); every load after it read the cache only
    assert 1 <= len(no_network) <= 2 and not any(offline for _host, offline in no_network)
    assert constants.HF_HUB_OFFLINE is True


def test_unreachable_hub_fails_fast_for_a_dataset(no_network, monkeypatch):
    from masksae.harvest import Corpus, CorpusSpec

    loads: list[str] = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: loads.append(a[0])  # would retry for a minute
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(CorpusError, match=r"the Hub is unreachable \(ConnectError.*offline\?"):
        next(iter(Corpus(CorpusSpec("some-org/some-corpus"))))
    assert 1 <= len(no_network) <= 2 and loads == []


def test_network_errors_are_told_apart_from_answers():
    class ConnectError(Exception):
        pass

    class RepositoryNotFoundError(Exception):
        pass

    assert is_network_error(ConnectError("dns"))
    assert is_network_error(OSError(errno.ECONNREFUSED, "refused"))
    wrapped = RuntimeError("failed")
    wrapped.__cause__ = TimeoutError("slow")
    assert is_network_error(wrapped)
    assert not is_network_error(RepositoryNotFoundError("404"))
    assert not is_network_error(ValueError("bad"))
