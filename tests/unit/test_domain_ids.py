"""Game ids: lower-case DNS-label material, checked before anything else sees them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmanager.domain.errors import ErrorCode, InvalidRequest
from rtmanager.domain.ids import (
    GAME_ID_PATTERN,
    container_name,
    engine_endpoint,
    is_valid_game_id,
    parse_game_id,
)

# The rule exactly as SPEC §2 "Input rules" writes it.
SPEC_GAME_ID = r"^[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?$"
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
ALPHABET = set("abcdefghijklmnopqrstuvwxyz0123456789-")

valid_game_ids = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?", fullmatch=True)


def spec_accepts(value: str) -> bool:
    """An oracle independent of any regex: the rule spelled out."""
    return (
        1 <= len(value) <= 51
        and set(value) <= ALPHABET
        and not value.startswith("-")
        and not value.endswith("-")
    )


def test_pattern_is_the_one_the_spec_states() -> None:
    assert GAME_ID_PATTERN == SPEC_GAME_ID


@pytest.mark.parametrize(
    "game_id",
    [
        "a",
        "7",
        "game-1",
        "a-b",
        "a--b",
        "0123456789",
        "a" * 51,
        "a" + "-" * 49 + "z",
        "x" * 25 + "-" + "y" * 25,
    ],
)
def test_valid_game_ids_are_accepted(game_id: str) -> None:
    assert is_valid_game_id(game_id)
    assert parse_game_id(game_id) == game_id


@pytest.mark.parametrize(
    "game_id",
    [
        pytest.param("", id="empty"),
        pytest.param("..", id="dot-dot"),
        pytest.param("../etc", id="path-traversal"),
        pytest.param("a/b", id="slash-inside"),
        pytest.param("/", id="slash"),
        pytest.param(".", id="dot"),
        pytest.param("a.b", id="dot-inside"),
        pytest.param("Game", id="upper-case"),
        pytest.param("GAME", id="all-upper-case"),
        pytest.param("game 1", id="space-inside"),
        pytest.param(" game", id="leading-space"),
        pytest.param("game ", id="trailing-space"),
        pytest.param("game\n", id="trailing-newline"),
        pytest.param("-game", id="leading-hyphen"),
        pytest.param("game-", id="trailing-hyphen"),
        pytest.param("-", id="only-hyphen"),
        pytest.param("a_b", id="underscore"),
        pytest.param("a" * 52, id="52-chars"),
        pytest.param("a" * 1024, id="1KB"),
        pytest.param("../" * 342, id="1KB-traversal"),
        pytest.param("\u0661\u0662", id="arabic-indic-digits"),
        pytest.param("\uff11", id="fullwidth-digit"),
        pytest.param("é", id="accented-letter"),
        pytest.param("ǆ", id="unicode-lower-letter"),
        pytest.param("game\x00", id="nul"),
        pytest.param("game;rm", id="semicolon"),
    ],
)
def test_malformed_game_ids_are_invalid_request(game_id: str) -> None:
    assert not is_valid_game_id(game_id)
    with pytest.raises(InvalidRequest) as caught:
        parse_game_id(game_id)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.metadata == {"field": "game_id"}


@pytest.mark.parametrize("value", [None, 42, b"game-1", ["game-1"]])
def test_non_string_game_ids_are_invalid_request(value: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_game_id(value)  # type: ignore[arg-type]


def test_invalid_request_message_does_not_echo_huge_input() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_game_id("x" * 1024)
    assert len(caught.value.message) < 300


@settings(max_examples=300)
@given(st.text())
def test_any_text_is_either_a_valid_game_id_or_invalid_request(value: str) -> None:
    try:
        accepted = parse_game_id(value)
    except InvalidRequest as error:
        assert error.code is ErrorCode.INVALID_REQUEST
        assert not spec_accepts(value)
    else:
        assert accepted == value
        assert re.fullmatch(SPEC_GAME_ID, value)
        assert spec_accepts(value)


@settings(max_examples=100)
@given(valid_game_ids)
def test_generated_valid_game_ids_are_accepted(game_id: str) -> None:
    assert spec_accepts(game_id)
    assert parse_game_id(game_id) == game_id


@settings(max_examples=100)
@given(valid_game_ids)
def test_container_name_of_a_valid_game_id_is_a_dns_label(game_id: str) -> None:
    name = container_name(game_id)

    assert name == f"galaxy-game-{game_id}"
    assert len(name) <= 63
    assert DNS_LABEL.fullmatch(name)


def test_longest_game_id_gives_a_63_character_container_name() -> None:
    assert len(container_name("a" * 51)) == 63


def test_engine_endpoint_uses_the_container_name_and_port() -> None:
    assert engine_endpoint("game-1", 8080) == "http://galaxy-game-game-1:8080"
