"""Patch: recreate a game's engine with a new image of the same major.minor.

The target must pass the allowlist and the semver patch rule (same
repository, same major.minor, different patch); then it is a restart with
the new image, recorded as op_kind `patch`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.restart import RecreateService


@dataclass(frozen=True)
class PatchRequest:
    """Recreate the engine of `game_id` with `image_ref`."""

    game_id: str
    image_ref: str
    op_source: OpSource
    source_ref: str = ""


class PatchService:
    """The patch lifecycle (SPEC §3 Patch, seed 003's rule)."""

    def __init__(self, recreate: RecreateService) -> None:
        self._recreate = recreate

    def handle(self, request: PatchRequest) -> OperationResult:
        """Recreate the engine with the patch image; never raises."""
        return self._recreate.recreate(
            op_kind=OpKind.PATCH,
            game_id=request.game_id,
            op_source=request.op_source,
            source_ref=request.source_ref,
            target_image_ref=request.image_ref,
        )
