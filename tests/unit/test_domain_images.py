"""Image references: Docker's grammar, the repository allowlist and the semver patch rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmanager.domain.errors import (
    ErrorCode,
    ImageNotAllowed,
    InvalidRequest,
    SemverPatchOnly,
)
from rtmanager.domain.images import (
    ImageRef,
    SemVer,
    check_patch_target,
    is_allowed,
    parse_image_ref,
    parse_semver,
    require_allowed,
)

SHA256 = "sha256:" + "0123456789abcdef" * 4

# --- parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "name", "tag", "digest"),
    [
        ("engine", "engine", "", ""),
        ("galaxy/engine", "galaxy/engine", "", ""),
        ("galaxy/engine-stub:1.0.0", "galaxy/engine-stub", "1.0.0", ""),
        ("galaxy/engines/stub/v2:latest", "galaxy/engines/stub/v2", "latest", ""),
        ("galaxy/engine_stub:v1.0.0-rc.1", "galaxy/engine_stub", "v1.0.0-rc.1", ""),
        ("galaxy/engine__stub.x:1", "galaxy/engine__stub.x", "1", ""),
        ("localhost/engine:1.0.0", "localhost/engine", "1.0.0", ""),
        ("localhost:5000/galaxy/engine:1.0.0", "localhost:5000/galaxy/engine", "1.0.0", ""),
        ("registry.example.com/galaxy/engine", "registry.example.com/galaxy/engine", "", ""),
        (
            "registry.example.com:5000/galaxy/engine:1.0.0",
            "registry.example.com:5000/galaxy/engine",
            "1.0.0",
            "",
        ),
        ("10.0.0.1:5000/galaxy/engine:1.0.0", "10.0.0.1:5000/galaxy/engine", "1.0.0", ""),
        ("galaxy/engine@" + SHA256, "galaxy/engine", "", SHA256),
        (
            "registry.example.com:5000/galaxy/engine:1.0.0@" + SHA256,
            "registry.example.com:5000/galaxy/engine",
            "1.0.0",
            SHA256,
        ),
        ("galaxy/engine:" + "t" * 128, "galaxy/engine", "t" * 128, ""),
    ],
)
def test_typical_references_are_parsed(ref: str, name: str, tag: str, digest: str) -> None:
    image = parse_image_ref(ref)

    assert image == ImageRef(name=name, tag=tag, digest=digest)
    assert str(image) == ref


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param("", id="empty"),
        pytest.param("galaxy/Engine", id="upper-case-in-path"),
        pytest.param("registry.example.com/Galaxy/engine", id="upper-case-after-registry"),
        pytest.param("galaxy/engine:", id="empty-tag"),
        pytest.param("galaxy/engine:1.0.0:", id="trailing-colon"),
        pytest.param("galaxy/engine@", id="empty-digest"),
        pytest.param("galaxy/engine@sha256:abc", id="short-digest"),
        pytest.param("..", id="dot-dot"),
        pytest.param("galaxy/../engine", id="dot-dot-component"),
        pytest.param("galaxy//engine", id="empty-component"),
        pytest.param("/engine", id="leading-slash"),
        pytest.param("engine/", id="trailing-slash"),
        pytest.param("-engine", id="leading-hyphen"),
        pytest.param("engine.", id="trailing-dot"),
        pytest.param("galaxy/engine 1.0.0", id="space"),
        pytest.param(" galaxy/engine", id="leading-space"),
        pytest.param("galaxy/engine:1.0.0\n", id="trailing-newline"),
        pytest.param("galaxy/engine:-1", id="tag-starting-with-hyphen"),
        pytest.param("galaxy/engine:" + "t" * 129, id="129-char-tag"),
        pytest.param("a" * 256, id="256-char-name"),
        pytest.param("a/" * 300 + "a", id="oversized"),
        pytest.param("http://galaxy/engine", id="url"),
        pytest.param("galaxy/ëngine", id="non-ascii"),
        pytest.param(":1.0.0", id="tag-only"),
    ],
)
def test_malformed_references_are_invalid_request(ref: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_image_ref(ref)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.metadata == {"field": "image_ref"}
    assert len(caught.value.message) < 400


@pytest.mark.parametrize("value", [None, 1, b"galaxy/engine"])
def test_non_string_references_are_invalid_request(value: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_image_ref(value)  # type: ignore[arg-type]


# A strategy built from the reference grammar, producing only valid refs.
_alnum = st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_path_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
_path = st.lists(_path_component, min_size=1, max_size=3).map("/".join)
_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,4}[a-zA-Z0-9])?", fullmatch=True)
_port = st.integers(min_value=1, max_value=65535).map(lambda port: f":{port}")
_registry = st.one_of(
    st.just("localhost"),
    _port.map(lambda port: f"localhost{port}"),
    st.builds(
        lambda parts, port: ".".join(parts) + port,
        st.lists(_domain_component, min_size=2, max_size=3),
        st.one_of(st.just(""), _port),
    ),
    st.builds(lambda name, port: name + port, _domain_component, _port),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.builds(
    lambda algorithm, hex_digits: f"{algorithm}:{hex_digits}",
    st.sampled_from(["sha256", "sha512", "multihash+base58"]),
    st.from_regex(r"[0-9a-f]{32,64}", fullmatch=True),
)
valid_references = st.builds(
    lambda registry, path, tag, digest: (
        (f"{registry}/" if registry else "")
        + path
        + (f":{tag}" if tag else "")
        + (f"@{digest}" if digest else "")
    ),
    st.one_of(st.none(), _registry),
    _path,
    st.one_of(st.none(), _tag),
    st.one_of(st.none(), _digest),
)


@settings(max_examples=150)
@given(valid_references)
def test_valid_references_round_trip(ref: str) -> None:
    image = parse_image_ref(ref)

    assert str(image) == ref
    assert parse_image_ref(str(image)) == image


@settings(max_examples=50)
@given(st.one_of(st.none(), _registry), _path, _tag)
def test_parsed_parts_are_the_registry_path_and_tag(
    registry: str | None, path: str, tag: str
) -> None:
    name = f"{registry}/{path}" if registry else path

    assert parse_image_ref(f"{name}:{tag}") == ImageRef(name=name, tag=tag)


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="aZ09:/@._-+ \n", max_size=40)))
def test_arbitrary_text_is_parsed_or_invalid_request(value: str) -> None:
    try:
        image = parse_image_ref(value)
    except InvalidRequest as error:
        assert error.code is ErrorCode.INVALID_REQUEST
    else:
        assert str(image) == value


# --- the allowlist -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "allowlist", "allowed"),
    [
        ("galaxy/engine:1.0.0", ["galaxy/"], True),
        ("galaxy/engines/stub:1.0.0", ["galaxy/"], True),
        ("galaxyevil/engine:1.0.0", ["galaxy/"], False),
        ("galaxy-evil/engine:1.0.0", ["galaxy"], False),
        ("galaxy/engine:1.0.0", ["galaxy"], True),
        ("evil/galaxy/engine:1.0.0", ["galaxy/"], False),
        ("registry.example.com/galaxy/engine:1.0.0", ["galaxy/"], False),
        ("galaxy/engine:1.0.0", ["registry.example.com/galaxy/"], False),
        (
            "registry.example.com:5000/galaxy/engine:1.0.0",
            ["registry.example.com:5000/galaxy/"],
            True,
        ),
        (
            "registry.example.com:5000/galaxyevil/engine:1.0.0",
            ["registry.example.com:5000/galaxy/"],
            False,
        ),
        (
            "registry.example.com/galaxy/engine:1.0.0",
            ["registry.example.com:5000/galaxy/"],
            False,
        ),
        ("other.example.com/galaxy/engine", ["registry.example.com/galaxy/"], False),
        ("galaxy/engines/stub:1.0.0", ["galaxy/engines/"], True),
        ("galaxy/engine-stub:1.0.0", ["galaxy/engines/"], False),
        ("galaxy/engine:1.0.0", ["other/", " galaxy/ "], True),
        ("galaxy/engine:1.0.0", ["", "  "], False),
        ("galaxy/engine:1.0.0", [], False),
    ],
)
def test_allowlist_prefixes_match_whole_path_components(
    ref: str, allowlist: list[str], allowed: bool
) -> None:
    assert is_allowed(parse_image_ref(ref), allowlist) is allowed


def test_image_outside_the_allowlist_is_image_not_allowed() -> None:
    image = parse_image_ref("galaxyevil/engine:1.0.0")

    with pytest.raises(ImageNotAllowed) as caught:
        require_allowed(image, ["galaxy/"])

    assert caught.value.code is ErrorCode.IMAGE_NOT_ALLOWED
    assert "galaxyevil/engine:1.0.0" in caught.value.message


def test_image_inside_the_allowlist_passes() -> None:
    require_allowed(parse_image_ref("galaxy/engine:1.0.0"), iter(["galaxy/"]))


@settings(max_examples=50)
@given(_path, _path)
def test_a_prefix_admits_exactly_the_images_under_it(prefix: str, rest: str) -> None:
    under = parse_image_ref(f"{prefix}/{rest}")
    glued = parse_image_ref(f"{prefix}x/{rest}")

    assert is_allowed(under, [f"{prefix}/"])
    assert not is_allowed(glued, [f"{prefix}/"])


# --- the semver patch rule ----------------------------------------------------


def _check(current: str, target: str) -> None:
    check_patch_target(parse_image_ref(current), parse_image_ref(target))


def test_next_patch_version_is_a_valid_patch() -> None:
    _check("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:1.0.1")


def test_older_patch_version_is_a_valid_patch() -> None:
    _check("galaxy/engine-stub:1.0.5", "galaxy/engine-stub:1.0.2")


def test_patch_target_may_pin_a_digest_beside_its_tag() -> None:
    _check("galaxy/engine-stub:1.0.0", f"galaxy/engine-stub:1.0.1@{SHA256}")


@pytest.mark.parametrize(
    ("current", "target"),
    [
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:1.1.0", id="minor-bump"),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:2.0.0", id="major-bump"),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:1.0.0", id="same-patch"),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-other:1.0.1", id="other-repo"),
        pytest.param(
            "galaxy/engine-stub:1.0.0",
            "registry.example.com/galaxy/engine-stub:1.0.1",
            id="other-registry",
        ),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:latest", id="target-latest"),
        pytest.param("galaxy/engine-stub:latest", "galaxy/engine-stub:1.0.1", id="current-latest"),
        pytest.param("galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1", id="two-part-version"),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub:1.01.1", id="leading-zero"),
        pytest.param("galaxy/engine-stub:1.0.0", "galaxy/engine-stub", id="untagged-target"),
        pytest.param(
            "galaxy/engine-stub:1.0.0", f"galaxy/engine-stub@{SHA256}", id="digest-only-target"
        ),
        pytest.param(
            f"galaxy/engine-stub@{SHA256}", "galaxy/engine-stub:1.0.1", id="digest-only-current"
        ),
    ],
)
def test_non_patch_targets_are_semver_patch_only(current: str, target: str) -> None:
    with pytest.raises(SemverPatchOnly) as caught:
        _check(current, target)
    assert caught.value.code is ErrorCode.SEMVER_PATCH_ONLY


_versions = st.tuples(
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=3),
)


@settings(max_examples=100)
@given(_versions, _versions)
def test_patch_is_allowed_iff_same_major_minor_and_other_patch(
    current: tuple[int, int, int], target: tuple[int, int, int]
) -> None:
    expected = current[:2] == target[:2] and current[2] != target[2]
    current_ref = "galaxy/engine:{}.{}.{}".format(*current)
    target_ref = "galaxy/engine:{}.{}.{}".format(*target)

    try:
        _check(current_ref, target_ref)
    except SemverPatchOnly:
        allowed = False
    else:
        allowed = True

    assert allowed is expected


@pytest.mark.parametrize(
    ("tag", "version"),
    [
        ("1.0.0", SemVer(1, 0, 0)),
        ("v2.10.3", SemVer(2, 10, 3)),
        ("1.0.0-rc.1", SemVer(1, 0, 0, "rc.1")),
        ("latest", None),
        ("1.0", None),
        ("01.0.0", None),
        ("", None),
    ],
)
def test_semver_is_read_from_tags(tag: str, version: SemVer | None) -> None:
    assert parse_semver(tag) == version
