"""Credentials: the MQTT users the fleet issued (password hashes only), for the broker's files."""

from __future__ import annotations

import time

from sqlalchemy import select

from ..models import CredentialRow
from .base import Repository
from .records import CredentialRecord, to_record

__all__ = ["CredentialRepo"]


class CredentialRepo(Repository):
    """``registry.credentials``."""

    def put(self, username: str, role: str, password_hash: str) -> None:
        """Create the user, or give it a new role and password hash."""
        with self._sessions.begin() as s:
            row = s.get(CredentialRow, username)
            if row is None:
                s.add(CredentialRow(username=username, role=role, password_hash=password_hash, created=time.time()))
            else:
                row.role, row.password_hash = role, password_hash

    def find(self) -> list[CredentialRecord]:
        """Every issued user, by name."""
        with self._sessions() as s:
            rows = s.scalars(select(CredentialRow).order_by(CredentialRow.username))
            return [to_record(CredentialRecord, r) for r in rows]
