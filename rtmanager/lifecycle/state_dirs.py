"""A game's state directory on the host: made the engine user's on start, removed on cleanup.

Both lifecycles act on the host's file system directly: the state
directory is bind-mounted into the engine, so it must exist, and belong to
the user the engine runs as, before the engine is created.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from rtmanager.domain.errors import InternalError
from rtmanager.ports import EngineUser


def prepare_state_dir(path: Path, user: EngineUser) -> None:
    """Create the state directory (and its parents) and make it `user`'s.

    A directory that `user` does not own yet (just created, or written by
    engines that ran as someone else: as root, before engines had a user of
    their own, or before `RTMANAGER_ENGINE_USER` changed) is given to them
    with everything in it, so the engine can write its earlier files too.
    Symbolic links are given away themselves, never followed. A directory
    already theirs costs one `stat`.

    Raises `InternalError` when the host refuses: to give files away,
    rtmanager must run as root (or as that very user).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        owner = path.stat()
        if (owner.st_uid, owner.st_gid) != (user.uid, user.gid):
            _give_tree(path, user)
    except OSError as error:
        raise InternalError(
            f"cannot prepare the state directory {path} for the engine user {user}: {error}",
            metadata={"state_path": str(path)},
        ) from error


def _give_tree(path: Path, user: EngineUser) -> None:
    os.chown(path, user.uid, user.gid, follow_symlinks=False)

    def refuse(error: OSError) -> None:
        raise error

    # os.walk does not descend into symbolic links to directories; they are
    # listed in `directories` and given away as links.
    for parent, directories, files in os.walk(path, onerror=refuse):
        for name in (*directories, *files):
            os.chown(os.path.join(parent, name), user.uid, user.gid, follow_symlinks=False)


def remove_state_dir(path: Path) -> list[str]:
    """Remove the state directory with everything in it; say what remains.

    Returns one line per path that could not be removed, with the reason
    (an immutable or append-only file, a read-only file system, files
    rtmanager may not remove when it does not run as root, ...); an empty
    list when nothing remains, also when there was nothing to remove. A
    directory left only because something in it remains is not listed
    itself.
    """
    failures: list[tuple[str, OSError]] = []

    def collect(failed: str, error: BaseException | None) -> None:
        if isinstance(error, FileNotFoundError):
            return  # already gone
        if not isinstance(error, OSError):
            error = OSError(errno.EIO, str(error))
        failures.append((failed, error))

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda _func, failed, error: collect(failed, error))
    else:

        def on_error(
            _func: Any,
            failed: str,
            info: tuple[type[BaseException], BaseException, TracebackType | None],
        ) -> None:
            collect(failed, info[1])

        shutil.rmtree(path, onerror=on_error)
    causes = [(failed, error) for failed, error in failures if error.errno != errno.ENOTEMPTY]
    return [f"{failed}: {error.strerror or error}" for failed, error in causes or failures]
