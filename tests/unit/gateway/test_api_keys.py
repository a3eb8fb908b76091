"""gateway.api_keys: the key file's format, the constant-time lookup, the bearer header."""

from __future__ import annotations

import pytest

from gateway.api_keys import bearer_token, load_api_keys, parse_keys
from gateway.config import GatewayConfig
from services.common.config import ConfigError


def test_a_key_file_with_comments_names_and_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nalice:sk-alice-1\n\n  sk-anonymous-2   # trailing comment\n")
    keys = load_api_keys(("sk-env-3",), str(path))
    assert keys.identify("sk-alice-1") == "alice"
    assert keys.identify("sk-anonymous-2") == f"{path}:4"
    assert keys.identify("sk-env-3") == "LLMESH_GATEWAY_API_KEYS:1"
    assert keys.identify("sk-alice-") is None and keys.identify("") is None
    assert all(len(digest) == 32 for _, digest in keys.entries)  # hashes, not the keys
    assert "sk-alice-1" not in repr(keys)


def test_no_keys_means_client_authentication_is_off():
    assert load_api_keys((), "") is None


def test_bad_key_files_are_config_errors_naming_them(tmp_path):
    with pytest.raises(ConfigError, match="api_keys_file='/no/such': unreadable"):
        load_api_keys((), "/no/such")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_api_keys((), str(empty))
    with pytest.raises(ConfigError, match="line 1: an API key must be one word"):
        parse_keys(["bob:two words"], "keys")


def test_the_refusal_says_why():
    keys = load_api_keys(("sk-right",), "")
    assert keys.refusal("Bearer sk-right") == ""
    assert keys.refusal(b"bearer sk-right") == ""
    assert keys.refusal("Bearer sk-wrong") == "invalid API key"
    assert keys.refusal(None).startswith("no API key")
    assert keys.refusal("Basic c2stcmlnaHQ=").startswith("no API key")
    assert bearer_token("Bearer  tok ") == "tok"


def test_gateway_tls_needs_both_files():
    with pytest.raises(ConfigError, match="give both or neither"):
        GatewayConfig(tls_cert="cert.pem")
