"""Ray Train's placement-group cleaner reads whether the controller lives from the GCS, not the state API.

Ray Train V2 starts a detached ``PlacementGroupCleaner`` actor that asks every second whether the
training controller is still alive, so that it can remove the run's placement group if the
controller dies ungracefully. It asks through Ray's state API (``ray.util.state.get_actor``),
which the dashboard serves. The train stage's private cluster runs without a dashboard (as a
user's cluster may), so every query fails: the cleaner logs "Failed to query Ray Train Controller
actor state. State API may be temporarily unavailable. Continuing to monitor." each second (231
lines in the CPU demo's train log, 262 in the model stage's) and would never notice a dead
controller. Here its ``is_actor_alive`` reads the controller's row of the GCS actor table
(``ray._private.state.actors``, what ``ray list actors`` is built on, no dashboard needed).

Applied by :func:`apply`, which the train stage's Ray job runs in each of its worker processes
(``worker_process_setup_hook``): the cleaner is such a process. Only for the Ray versions in
``TESTED``; elsewhere the cleaner stays as Ray ships it, with one warning line.
"""

from __future__ import annotations

from . import PatchTargetMissing, replace_attribute, supported, warn

PATCH = "workflow.patches.ray_train_controller_state"
TESTED = {"ray": "==2.60.*"}
CONSEQUENCE = ("without a dashboard Ray Train's placement-group cleaner logs a warning every second and does not "
               "notice a dead controller")


def controller_alive(actor_id: str, timeout: int) -> bool:
    """Whether the actor is alive, from the GCS actor table (``timeout`` is the state API's; unused)."""
    from ray._private import state

    found = state.actors(actor_id=actor_id)
    return bool(found) and found.get("State") != "DEAD"


def apply() -> None:
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    try:
        replace_attribute(placement_group_cleaner, "is_actor_alive", controller_alive)
    except PatchTargetMissing as err:
        warn(PATCH, f"{err}; {CONSEQUENCE}")
