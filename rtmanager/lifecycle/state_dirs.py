"""A game's state directory on the host, made the engine user's on start.

The state directory is bind-mounted into the engine, so it must exist, and
belong to the user the engine runs as, before the engine is created.
"""

from __future__ import annotations

import os
from pathlib import Path

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
