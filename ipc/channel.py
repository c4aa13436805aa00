"""The supervisor's private line to each worker: a SOCK_SEQPACKET socketpair carrying ControlMessages.

Seqpacket keeps message boundaries, so there is no framing to get wrong. Both ends are non-blocking:
the supervisor must never stall on a slow worker, and a worker must never stall its main loop on
the supervisor. A message that cannot be sent right now is dropped; everything sent on
this line is either periodic (heartbeats, reports) or answered (sync requests), so a lost one is
repaired by the next.
"""

from __future__ import annotations

import contextlib
import socket

import msgspec

from conflux.ipc.codec import control_decoder, encode_control

MAX_MESSAGE_BYTES = 1 << 20


class Channel:
    """One end of a control socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        """Made by the supervisor before fork: (supervisor end, worker end), both inheritable."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (parent, child):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE_BYTES)
        child.set_inheritable(True)
        return parent, child

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: object) -> bool:
        try:
            self.sock.send(encode_control(message))
            return True
        except OSError:  # full right now, or the other end is gone (the supervisor notices through waitpid)
            return False

    def receive(self, max_messages: int = 1000) -> tuple[list[object], bool]:
        """Every message waiting now, and whether the other end has closed."""
        messages: list[object] = []
        while len(messages) < max_messages:
            try:
                data = self.sock.recv(MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return messages, False
            except OSError:
                return messages, True
            if not data:
                return messages, True
            # A garbled message is lost like an unsent one; the next report repairs it.
            with contextlib.suppress(msgspec.DecodeError):
                messages.append(control_decoder.decode(data))
        return messages, False

    def close(self) -> None:
        self.sock.close()
