# SPDX-License-Identifier: GPL-2.0-or-later
"""Exception classes shared by the dom0 client.

Every error the client reports is a QbackupError whose message is one line,
fit to print as is. Text that came from the backup qube goes through
`sanitize` first, so it can never carry control characters to a terminal.
"""

MAX_REMOTE_TEXT = 200


def sanitize(untrusted_text: str, limit: int = MAX_REMOTE_TEXT) -> str:
    """Untrusted text made printable ASCII (others become '?'), cut to `limit`."""
    cut = untrusted_text[:limit]
    safe = "".join(c if " " <= c <= "~" else "?" for c in cut)
    return safe + "..." if len(untrusted_text) > limit else safe


class QbackupError(Exception):
    """Base class: a failure with a one-line message for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


class IntegrityError(QbackupError):
    """Data from the repository failed authentication or validation."""


class ProtocolError(QbackupError):
    """The backup qube sent malformed, oversized or unexpected data."""


class RemoteError(QbackupError):
    """The backup qube answered a request with an error frame."""

    def __init__(self, code: str, message: str):
        self.code = sanitize(code, 64)
        self.message = sanitize(message)
        super().__init__(f"backup qube error {self.code}: {self.message}")


class UsageError(QbackupError):
    """The command line asks for something impossible (exit 2)."""


class BadPassphrase(QbackupError):
    """The passphrase does not open the repository's key file."""


class RollbackError(QbackupError):
    """The repository serves an older or different history than dom0 has seen."""


class RepositoryChanged(RollbackError):
    """The backup qube serves another repository under a name dom0 has pinned."""

    def __init__(self, message: str, *, old: bytes, new: bytes):
        super().__init__(message)
        self.old, self.new = old, new
