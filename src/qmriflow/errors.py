"""Errors that end one session's job with a one-line, PHI-free message."""

from __future__ import annotations

from pathlib import Path


class QmriflowError(Exception):
    """A failure the user can act on.

    ``str(err)`` is always a single line naming (where known) the session, the file and
    the reason: ``session sub-x_ses-y: path/to/file: reason``. Never put patient-identifying
    header values (name, ID, birth date) into these messages.
    """

    def __init__(self, reason: str, *, session: str | None = None, path: str | Path | None = None):
        self.reason = " ".join(str(reason).split())  # force one line
        self.session = session
        self.path = str(path) if path is not None else None
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.session:
            parts.append(f"session {self.session}")
        if self.path:
            parts.append(self.path)
        parts.append(self.reason)
        return ": ".join(parts)

    def with_context(self, *, session: str | None = None, path: str | Path | None = None):
        """Return a copy with session/path filled in where they were missing."""
        return type(self)(
            self.reason,
            session=self.session or session,
            path=self.path or (str(path) if path is not None else None),
        )


class InputError(QmriflowError):
    """Bad input data: corrupt file, missing series, absurd acquisition parameters, NaNs."""


class ConfigError(QmriflowError):
    """Invalid configuration value or key."""


class ToolError(QmriflowError):
    """An external tool (dcm2niix, ANTs, HD-BET, FSL) failed or is unavailable."""
