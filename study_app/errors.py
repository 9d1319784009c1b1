"""Errors of the participant API: an HTTP status, a machine code and a message for people.

Scheduling and vote recording raise :class:`ApiError`; the API blueprint turns it into
``{"error": message, "code": code, "status": status}`` (plus ``field`` for validation
errors) after rolling back, so a rejected request changes nothing.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the API refuses, with its HTTP status (4xx) and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"error": self.message, "code": self.code, "status": self.status}
        if self.field is not None:
            body["field"] = self.field
        return body
