"""`rtmanager serve` refuses to accept bearer tokens in cleartext off loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import ADMIN_TOKEN, GM_TOKEN, free_port, run_cli, server_env

pytestmark = pytest.mark.e2e


def test_serve_with_tokens_on_a_non_loopback_address_without_tls_exits_2(
    tmp_path: Path,
) -> None:
    # Refused while building the application: nothing is bound, no
    # dependency is reached, so no schema or Redis prefix is needed.
    env = server_env(
        pg_schema="unused",
        redis_prefix="unused:",
        cluster="test-unused",
        state_root=tmp_path,
        port=free_port(),
    )
    env["RTMANAGER_GRPC_ADDR"] = f"0.0.0.0:{free_port()}"
    env["RTMANAGER_AUTH_TOKENS"] = f"game_master={GM_TOKEN},admin={ADMIN_TOKEN}"

    refused = run_cli(env, "serve", timeout=30)

    assert refused.returncode == 2, refused.stderr
    assert "refusing to accept bearer tokens in cleartext" in refused.stderr
    assert "RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true" in refused.stderr


def test_serve_with_a_bad_opt_in_value_is_a_config_error(tmp_path: Path) -> None:
    env = server_env(
        pg_schema="unused",
        redis_prefix="unused:",
        cluster="test-unused",
        state_root=tmp_path,
        port=free_port(),
    )
    env["RTMANAGER_ALLOW_CLEARTEXT_TOKENS"] = "perhaps"

    refused = run_cli(env, "serve", timeout=30)

    assert refused.returncode == 2
    assert "RTMANAGER_ALLOW_CLEARTEXT_TOKENS='perhaps'" in refused.stderr
