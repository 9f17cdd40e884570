"""Every exception tunnelgate raises on purpose, under :class:`TunnelgateError`
(the tree is drawn in docs/ARCHITECTURE.md, "Errors"). Exceptions keep their
data in attributes and build their text in ``__str__``. ``OSError`` and
``ssl.SSLError`` become :class:`TransportError` at the transport edge and
nowhere else. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


class TunnelgateError(Exception):
    """Base class of every error tunnelgate raises on purpose."""


class _Reasoned(TunnelgateError):
    """An error told by one ``reason``, shown after the class's ``prefix``."""

    prefix = ""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.prefix + self.reason


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration."""

    source: str  # a file name, or "command line"
    key: str  # dotted key path, e.g. "services[1].local"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(TunnelgateError):
    """The configuration (flags or file) cannot be used."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"bad configuration: {self.problems[0]}"
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"bad configuration ({len(self.problems)} problems):\n{lines}"


class ProtocolError(_Reasoned):
    """Bytes on a connection do not follow the wire protocol."""

    prefix = "protocol error: "


class LocalProtocolError(ProtocolError):
    """This side was about to break the protocol: a bug in tunnelgate."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another version of the protocol."""


class AuthenticationError(_Reasoned):
    """The peer refused our credentials, or we refused its. Not retried."""

    prefix = "authentication failed: "


class CertificateRefusedError(AuthenticationError):
    """The gateway refused this agent's TLS certificate (or its lack of one)."""


class PeerVerificationError(AuthenticationError):
    """The gateway's TLS certificate is not the one the agent was told to expect."""

    def __init__(self, reason: str, expected: str = "", seen: str = "") -> None:
        super().__init__(reason)
        self.expected = expected
        self.seen = seen

    def __str__(self) -> str:
        text = f"gateway verification failed: {self.reason}"
        if self.expected or self.seen:
            text += f" (expected {self.expected or '?'}, seen {self.seen or '?'})"
        return text


class TransportError(_Reasoned):
    """The network failed under a connection. Reconnecting may help. ``errno`` is the
    system's error number when one is known (``ETIMEDOUT`` for a connect that timed out)."""

    def __init__(self, reason: str, errno: int | None = None) -> None:
        super().__init__(reason)
        self.errno = errno


class ConnectionClosed(TunnelgateError):
    """A connection ended. ``how`` is "eof", "reset", "timeout" or "closed"."""

    def __init__(self, how: str, detail: str = "") -> None:
        super().__init__(how, detail)
        self.how = how
        self.detail = detail

    def __str__(self) -> str:
        return f"connection {self.how}" + (f": {self.detail}" if self.detail else "")


class SessionOver(_Reasoned):
    """A session ends on purpose, for ``reason``; raised inside its task group
    to end every task of the session."""
