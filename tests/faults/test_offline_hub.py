"""lowbit.io.hub (issue 16, case 10): a hub id fails at once, in one line, when the hub cannot be reached (no network
is used: the socket calls are replaced)."""

from __future__ import annotations

import socket

import pytest

from lowbit.io import hub


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every connection attempt fails as without a network; returns the attempts."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_unreachable_keeps_transformers_to_the_cache(no_network):
    assert not hub.hub_reachable()
    assert hub.hub_kwargs() == {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


def test_reachable_changes_nothing(monkeypatch):
    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.hub_kwargs() == {}


def test_hf_hub_offline_is_not_asked(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.hub_reachable() and not no_network


@pytest.mark.parametrize("command", [["quantize", "-o", "{out}"], ["eval", "--data", "{text}"]])
def test_an_offline_hub_id_is_one_line_without_retries(command, no_network, tmp_path, text_file, probe):
    """Before, huggingface_hub retried each file five times with a backoff: 22 lines over 50 s."""
    argv = [command[0], "lowbit-probe/absent-model", *command[1:], "--quiet"]
    out = tmp_path / "out"
    o = probe([a.format(out=out, text=text_file) for a in argv], outputs=(out,))
    assert "cannot be reached and the model is not in the cache" in o.err
    # lowbit's one connect, and at most huggingface_hub's fetch of its user-agent registry (once per
    # process, never retried); the retries were five per file
    assert len(no_network) <= 2, f"connections tried: {no_network}"
