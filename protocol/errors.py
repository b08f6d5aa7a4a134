"""Errors of the peer protocol (h11's split): Local = we misused the session, Remote = the peer misbehaved.

Inside protocol/ only LocalProtocolError is raised while validating; Session.next_event() converts it to
RemoteProtocolError at the one receive boundary. Either moves the session to the sticky ERROR state.
"""
from __future__ import annotations


class ProtocolError(Exception):
    """Base: `what` is a short kind (frame-too-large, bad-checksum, unexpected-message, ...)."""

    def __init__(self, msg: str, what: str = "protocol") -> None:
        super().__init__(msg)
        self.what = what

    def __reduce__(self):
        return (type(self), (str(self), self.what))


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow now (caller bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message the protocol does not allow; the message names what was wrong."""
