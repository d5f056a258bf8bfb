"""Numbers the tracking store hands out in order, for electing a run and holding a lock without
trusting any client's clock.

The versions of a registered model are numbered by the store's database, one after another, in the
order the store creates them. A ticket is such a version of the registered model `moecl.tickets`,
tagged with what it is for (`kind`, `key`) and by whom. Whoever takes a ticket and then lists the
tickets of its kind and key sees every ticket taken before its own, so "the lowest ticket" means the
same to every reader, whichever machine or MLflow user took it. A ticket's creation time is also the
store's, so its age can be judged on the store's clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from . import registry

ROLL = "moecl.tickets"


@dataclass(frozen=True)
class Ticket:
    number: int
    created_ms: int  # the store's clock
    tags: dict[str, str]


class TicketRoll:
    def __init__(self, tracking_uri: str, name: str = ROLL):
        self.client = registry.connect(tracking_uri)
        self.name = name

    def _ensure(self) -> None:
        try:
            self.client.create_registered_model(self.name, description="moecl's claim and lock tickets (not a model)")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise

    def take(self, kind: str, key: str, **tags: str) -> Ticket:
        """A new ticket, numbered after every ticket taken before it."""
        tags = {"kind": kind, "key": key, **tags}
        try:
            version = self.client.create_model_version(self.name, source=f"moecl-ticket:/{kind}", tags=tags)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                raise
            self._ensure()  # the first ticket ever: the roll itself is made on demand
            version = self.client.create_model_version(self.name, source=f"moecl-ticket:/{kind}", tags=tags)
        return Ticket(int(version.version), int(version.creation_timestamp), tags)

    def tickets(self, kind: str, key: str) -> list[Ticket]:
        """The tickets of this kind and key not released, lowest first."""
        try:
            found = self.client.search_model_versions(
                f"name='{self.name}' and tags.kind='{kind}' and tags.key='{key}'", max_results=10000)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
                return []
            raise
        return sorted((Ticket(int(v.version), int(v.creation_timestamp), dict(v.tags)) for v in found),
                      key=lambda t: t.number)

    def release(self, ticket: Ticket) -> None:
        self.client.delete_model_version(self.name, str(ticket.number))
