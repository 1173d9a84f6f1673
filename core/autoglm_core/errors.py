"""The one base of the errors AutoGLM reports to a user.

Each carries the HTTP status a server answers with, so the server maps this one class (and its
``to_json``) instead of a list of exception types; a CLI prints ``str(error)``, one line that
names what is wrong and what is allowed.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AutoGLMError(Exception):
    """An error with a message for the user and the HTTP status that fits it (``status``)."""

    #: The HTTP status of this kind of error; an instance may override it (``status=`` keyword).
    default_status: ClassVar[int] = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = self.default_status if status is None else status

    @property
    def message(self) -> str:
        return str(self)

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. ``Retry-After``); none by default."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The response body: ``{"error": message}``, the form every route answers errors in."""
        return {"error": self.message}
