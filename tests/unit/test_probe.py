"""`rtmanager health`'s choice of address."""

from __future__ import annotations

from rtmanager.probe import probe_address


def test_a_wildcard_listen_address_is_probed_on_loopback() -> None:
    assert probe_address({"RTMANAGER_GRPC_ADDR": "0.0.0.0:7000"}) == "127.0.0.1:7000"
    assert probe_address({"RTMANAGER_GRPC_ADDR": "[::]:7000"}) == "127.0.0.1:7000"


def test_a_specific_listen_address_is_probed_as_it_is() -> None:
    assert probe_address({"RTMANAGER_GRPC_ADDR": "10.1.2.3:7000"}) == "10.1.2.3:7000"


def test_without_a_listen_address_the_default_is_probed() -> None:
    assert probe_address({}) == "127.0.0.1:50051"
