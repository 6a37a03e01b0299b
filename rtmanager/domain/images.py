"""Docker image references, the allowlist and the semver patch rule.

The grammar is Docker's reference grammar:
`[registry[:port]/]path[:tag][@algorithm:hex]`, lower-case path components,
a name of at most 255 characters and a tag of at most 128.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rtmanager.domain.errors import ImageNotAllowed, InvalidRequest, SemverPatchOnly

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$",
    re.ASCII,
)
_MAX_NAME_LENGTH = 255
_SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9][0-9]*)\.(?P<minor>0|[1-9][0-9]*)\.(?P<patch>0|[1-9][0-9]*)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?$",
    re.ASCII,
)


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference. `name` includes the registry when given."""

    name: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_ref(value: str) -> ImageRef:
    """Parse `value` with Docker's grammar; raise `InvalidRequest` if it does not fit.

    A first component is a registry only when it looks like one (has a dot or
    a port, or is `localhost`), as Docker decides.
    """
    if not isinstance(value, str) or not value or len(value) > 512:
        raise _bad_image(value)
    match = _REFERENCE.fullmatch(value)
    if match is None:
        raise _bad_image(value)
    domain, path = match.group("domain"), match.group("path")
    if domain is not None and not _looks_like_registry(domain):
        # `galaxy/engine`: the first component is part of the path, and so
        # must follow the path grammar (lower case).
        if re.fullmatch(_PATH_COMPONENT, domain, re.ASCII) is None:
            raise _bad_image(value)
        path = f"{domain}/{path}"
        domain = None
    name = f"{domain}/{path}" if domain else path
    if len(name) > _MAX_NAME_LENGTH:
        raise _bad_image(value)
    return ImageRef(name=name, tag=match.group("tag") or "", digest=match.group("digest") or "")


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def _bad_image(value: object) -> InvalidRequest:
    shown = value if isinstance(value, str) and len(value) <= 128 else f"{str(value)[:128]}..."
    return InvalidRequest(
        f"image_ref {shown!r} is not a valid Docker reference "
        "([registry[:port]/]repository[:tag][@digest])",
        metadata={"field": "image_ref"},
    )


def is_allowed(image: ImageRef, allowlist: Iterable[str]) -> bool:
    """Report whether the image's repository lies under one of the prefixes.

    A prefix matches whole path components: `galaxy/` admits `galaxy/engine`
    but not `galaxyevil/engine`.
    """
    for prefix in allowlist:
        stem = prefix.strip().rstrip("/")
        if stem and (image.name == stem or image.name.startswith(f"{stem}/")):
            return True
    return False


def require_allowed(image: ImageRef, allowlist: Iterable[str]) -> None:
    """Raise `ImageNotAllowed` unless the image is in the allowlist."""
    prefixes = list(allowlist)
    if not is_allowed(image, prefixes):
        raise ImageNotAllowed(
            f"image {image} is outside the allowlist ({', '.join(prefixes) or 'empty'})",
            metadata={"image_ref": str(image)},
        )


@dataclass(frozen=True, order=True)
class SemVer:
    """A `MAJOR.MINOR.PATCH[-pre]` version taken from an image tag."""

    major: int
    minor: int
    patch: int
    prerelease: str = ""


def parse_semver(tag: str) -> SemVer | None:
    """Return the version a tag names, or None when it is not semver."""
    match = _SEMVER.fullmatch(tag)
    if match is None:
        return None
    return SemVer(
        int(match.group("major")),
        int(match.group("minor")),
        int(match.group("patch")),
        match.group("pre") or "",
    )


def check_patch_target(current: ImageRef, target: ImageRef) -> None:
    """Enforce the semver patch rule; raise `SemverPatchOnly` when it fails.

    The target must be the same repository, its tag a semver version with
    the same major.minor as the current tag and a different patch number.
    """
    if current.name != target.name:
        raise SemverPatchOnly(f"patch must keep the repository {current.name}; got {target.name}")
    current_version, target_version = parse_semver(current.tag), parse_semver(target.tag)
    if current_version is None or target_version is None:
        raise SemverPatchOnly(
            f"patch needs semver tags on both images; got {current.tag or '(none)'} "
            f"-> {target.tag or '(none)'}"
        )
    if (current_version.major, current_version.minor) != (
        target_version.major,
        target_version.minor,
    ):
        raise SemverPatchOnly(
            f"patch must keep major.minor {current_version.major}.{current_version.minor}; "
            f"got {target.tag}"
        )
    if current_version.patch == target_version.patch:
        raise SemverPatchOnly(f"patch must change the patch version; {target.tag} keeps it")
