"""Advertised addresses: explicit wins, a wildcard bind advertises this host's name."""

from __future__ import annotations

import socket

import pytest

from services.common.addresses import advertised_address, split_host_port


@pytest.mark.parametrize("bound", ["0.0.0.0:50061", "[::]:50061", ":50061"])
def test_a_wildcard_bind_advertises_the_host_name(bound):
    assert advertised_address(bound) == f"{socket.gethostname()}:50061"


def test_an_explicit_advertise_address_wins_and_a_specific_bind_is_kept():
    assert advertised_address("0.0.0.0:50061", "10.0.0.2:7000") == "10.0.0.2:7000"
    assert advertised_address("10.0.0.2:50061") == "10.0.0.2:50061"


def test_split_host_port_keeps_ipv6_brackets():
    assert split_host_port("[::1]:80") == ("[::1]", "80")
    assert split_host_port("host:") == ("host", "")
