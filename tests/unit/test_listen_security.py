"""Where the server may listen: no tokens off loopback, no cleartext tokens off loopback."""

from __future__ import annotations

import pytest

from rtmanager.app import StartupError, check_exposure


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051"])
@pytest.mark.parametrize("has_tokens", [False, True])
def test_loopback_is_accepted_with_or_without_tokens(address: str, has_tokens: bool) -> None:
    check_exposure(address, has_tokens=has_tokens, tls=False, allow_cleartext_tokens=False)


def test_no_tokens_off_loopback_is_refused_even_with_tls() -> None:
    with pytest.raises(StartupError, match="without authentication"):
        check_exposure("0.0.0.0:50051", has_tokens=False, tls=True, allow_cleartext_tokens=True)


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "10.1.2.3:50051", "rtmanager:50051"])
def test_tokens_in_cleartext_off_loopback_are_refused(address: str) -> None:
    with pytest.raises(StartupError) as refused:
        check_exposure(address, has_tokens=True, tls=False, allow_cleartext_tokens=False)
    message = str(refused.value)
    assert f"cleartext on {address}" in message
    assert "RTMANAGER_TLS_CERT" in message
    assert "RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true" in message


def test_tokens_over_tls_off_loopback_are_accepted() -> None:
    check_exposure("0.0.0.0:50051", has_tokens=True, tls=True, allow_cleartext_tokens=False)


def test_cleartext_tokens_off_loopback_are_accepted_when_the_network_is_declared_trusted() -> None:
    check_exposure("0.0.0.0:50051", has_tokens=True, tls=False, allow_cleartext_tokens=True)
