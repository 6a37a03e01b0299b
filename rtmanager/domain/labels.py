"""Docker labels the service stamps on, and reads from, engine containers.

A container is "ours" only when it carries `OWNER=rtmanager` and belongs to
this deployment's cluster; a missing cluster label counts as
`DEFAULT_CLUSTER`, so containers of the original service are adopted by a
default deployment.
"""

from __future__ import annotations

from collections.abc import Mapping

OWNER = "com.galaxy.owner"
OWNER_VALUE = "rtmanager"
CLUSTER = "com.galaxy.rtmanager.cluster"
GAME_ID = "com.galaxy.game_id"
IMAGE_REF = "com.galaxy.image_ref"
DEFAULT_CLUSTER = "default"


def is_owned(labels: Mapping[str, str] | None, cluster: str) -> bool:
    """Report whether a container with `labels` belongs to deployment `cluster`."""
    if not labels or labels.get(OWNER) != OWNER_VALUE:
        return False
    return labels.get(CLUSTER, DEFAULT_CLUSTER) == cluster


def engine_labels(
    *, cluster: str, game_id: str, image_ref: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the labels of a new engine container (extra labels cannot override ours)."""
    labels = dict(extra or {})
    labels.update({OWNER: OWNER_VALUE, CLUSTER: cluster, GAME_ID: game_id, IMAGE_REF: image_ref})
    return labels
