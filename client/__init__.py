"""stealguard.client: call the sidecar from a model server.

    from stealguard.client import DefenseClient, protect
    sidecar = DefenseClient("127.0.0.1:50051", timeout=0.5)
    safe = protect(sidecar, probabilities, model="mnist")   # fail-closed
"""

from stealguard.client.defense import (
    AsyncDefenseClient,
    DefenseClient,
    SidecarError,
    channel_credentials,
)
from stealguard.client.protect import label_only, protect, protect_async

__all__ = [
    "AsyncDefenseClient",
    "DefenseClient",
    "SidecarError",
    "channel_credentials",
    "label_only",
    "protect",
    "protect_async",
]
