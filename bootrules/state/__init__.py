"""What bootrules remembers about machines: `once:` state and the machines seen.

`open_stores` is the one door: it opens both stores from the settings, for one purpose.
`database` runs the SQL on SQLite or PostgreSQL under deadlines; `once_store` and
`machine_store` are the two stores' operations; `health` keeps how they are doing for
/healthz and probes them; `once` decides whether a `once:` rule still answers a machine
and takes the done callbacks; `tokens` makes and checks the signed tokens; `arming`
writes armed rows in batches; `recorder` writes the machines seen, off the request path.
Imports the shared vocabulary only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..settings import Settings
from .database import PATIENT_DEADLINE, Database, is_server, open_database
from .machine_store import MachineStore
from .once_store import OnceStore

if TYPE_CHECKING:
    from .health import HealthBoard

# What a store is opened for: (waits its turn for SQLite's write lock, seconds a transaction may take).
PURPOSES = {
    "request": (False, None),  # a decision or a callback: the default deadline
    "pages": (True, 5.0),  # the status page and the API, on their own thread
    "background": (True, PATIENT_DEADLINE),  # batches, pruning, probes
    "command": (True, PATIENT_DEADLINE),  # the command line
}


@dataclass(frozen=True)
class Stores:
    """The `once:` store and the machines-seen store (one database when they share a PostgreSQL)."""

    once: OnceStore
    machines: MachineStore

    def close(self) -> None:
        self.once.close()
        self.machines.close()


def open_stores(settings: Settings, purpose: str = "request", board: "HealthBoard | None" = None) -> Stores:
    """Both stores the settings name (connected when first used), opened for `purpose`.

    With the `board` of a server, the `once:` store must be the one the server has been
    using: a store with another identity is refused, and a missing SQLite file is not made
    again. The first identity met is written on the board.
    """
    patient, deadline = PURPOSES[purpose]
    state_location, machines_location = settings.state_location(), settings.machines_location()
    identity = {} if board is None else {"expected_id": board.expected_id("state"),
                                         "found_id": lambda store_id, file: board.learned("state", store_id, file)}
    once = open_database(state_location, patient=patient, deadline=deadline, **identity)
    machines: Database = once if machines_location == state_location else open_database(
        machines_location, patient=patient, deadline=deadline)
    return Stores(OnceStore(once), MachineStore(machines))


__all__ = ["MachineStore", "OnceStore", "Stores", "is_server", "open_stores"]
