"""How `rtmanager ctl` fails: the exit code of each of the client's exception
classes, the code a failure is printed with, and the usage errors found
outside the parser (options that cannot work together, unreadable files).

The exit codes of `--help` (`EPILOG`) are built from `EXIT_CODES`, so what
the help says and what `run` returns cannot drift apart.
"""

from __future__ import annotations

from rtmanager.client import (
    ConflictError,
    ContainerStartFailedError,
    ImageNotAllowedError,
    ImagePullFailedError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RuntimeManagerClientError,
    SemverPatchOnlyError,
    ServiceUnavailableError,
    UnauthenticatedError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_REJECTED = 5
EXIT_AUTH = 6
EXIT_UNAVAILABLE = 7
EXIT_INTERRUPTED = 130

# The exit code of a failed call, by the client's exception class (a
# subclass inherits its base's); any other failure exits EXIT_FAILURE.
EXIT_CODES: dict[type[RuntimeManagerClientError], int] = {
    InternalServerError: EXIT_FAILURE,
    InvalidRequestError: EXIT_USAGE,
    NotFoundError: EXIT_NOT_FOUND,
    ConflictError: EXIT_CONFLICT,
    SemverPatchOnlyError: EXIT_REJECTED,
    ImageNotAllowedError: EXIT_REJECTED,
    ImagePullFailedError: EXIT_REJECTED,
    ContainerStartFailedError: EXIT_REJECTED,
    UnauthenticatedError: EXIT_AUTH,
    PermissionDeniedError: EXIT_AUTH,
    ServiceUnavailableError: EXIT_UNAVAILABLE,
}
_EXIT_NOTES = {
    EXIT_FAILURE: ", and any other failure (including unimplemented)",
    EXIT_USAGE: ", and usage errors",
    EXIT_UNAVAILABLE: " (including deadline exceeded and an unreachable server)",
}


def exit_code_for(error: RuntimeManagerClientError) -> int:
    """The process exit code of a failed call (see `EXIT_CODES`)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILURE


def _exit_codes_help() -> str:
    codes: dict[int, list[str]] = {EXIT_OK: ["success"]}
    for cls, code in EXIT_CODES.items():
        codes.setdefault(code, []).append(cls.error_code)
    lines = [
        f"{code:>5}  {', '.join(codes[code])}{_EXIT_NOTES.get(code, '')}" for code in sorted(codes)
    ]
    lines.append(
        f"{EXIT_INTERRUPTED:>5}  interrupted (Ctrl-C); ending watch with Ctrl-C is a success"
    )
    return "\n".join(lines)


EPILOG = f"""\
exit codes:
{_exit_codes_help()}

errors are printed to stderr as 'rtmanager ctl: <code>: <message>'.
"""


class UsageError(Exception):
    """Options that cannot work together, or a file that cannot be read."""


def error_label(error: RuntimeManagerClientError) -> str:
    """The code shown for a failed call: the stable code, else the gRPC status name."""
    return error.code or error.status.name.lower()
