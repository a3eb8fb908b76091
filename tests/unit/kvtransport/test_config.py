from __future__ import annotations

import pytest

from kvtransport import Backend, SchedulingPolicy, TransportConfig
from kvtransport.config import MIB
from services.common.config import ConfigError


def test_defaults_are_ucx_priority_with_4mib_chunks():
    config = TransportConfig()
    assert config.backend is Backend.UCX
    assert config.scheduling is SchedulingPolicy.PRIORITY
    assert config.kv_chunk_bytes == 4 * MIB
    assert config.ucx_peer_error_handling is False
    assert config.mailbox_slot_bytes == config.max_header_bytes + config.inline_max_bytes


def test_strings_become_enums():
    config = TransportConfig(backend="tcp", scheduling="fifo")
    assert config.backend is Backend.TCP
    assert config.scheduling is SchedulingPolicy.FIFO


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"backend": "ib"}, "backend"),
        ({"scheduling": "lifo"}, "scheduling"),
        ({"kv_chunk_bytes": 1000}, "kv_chunk_bytes"),
        ({"kv_window": 0}, "kv_window"),
        ({"inline_max_bytes": -1}, "inline_max_bytes"),
        ({"recv_timeout_s": 0}, "recv_timeout_s"),
        ({"send_timeout_s": -1.0}, "send_timeout_s"),
        ({"tcp_port": 70000}, "tcp_port"),
        ({"num_mailbox_slots": 1}, "num_mailbox_slots"),
        ({"ucx_options": (("UCX_TLS", "tcp"),)}, "UCX_TLS"),
        ({"kv_window": True}, "kv_window"),
    ],
)
def test_bad_values_raise_value_error_naming_them(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        TransportConfig(**kwargs)


def test_config_is_frozen():
    config = TransportConfig()
    with pytest.raises(AttributeError):
        config.kv_window = 3  # type: ignore[misc]


def test_ucx_leaves_cma_out_unless_the_user_chooses_transports(monkeypatch):
    """A CMA read from a peer that just died is fatal without peer error handling (it
    crashed a surviving worker in the chaos test): UCX runs without it by default."""
    from kvtransport.ucx import NO_CMA, _ucx_options

    monkeypatch.delenv("UCX_TLS", raising=False)
    assert _ucx_options(TransportConfig())["TLS"] == NO_CMA == "^cma"
    chosen = TransportConfig(ucx_options=(("TLS", "tcp"),))
    assert _ucx_options(chosen)["TLS"] == "tcp"
    monkeypatch.setenv("UCX_TLS", "sm,cma")
    assert "TLS" not in _ucx_options(TransportConfig())
