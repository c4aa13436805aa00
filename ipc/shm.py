"""A single-producer, single-consumer ring of frames in shared memory, with eventfd wake-ups.

The supervisor creates each ring (a file in /dev/shm plus two eventfds) before it forks; a worker
maps the file after it starts. Positions are byte counters that only grow; the writer owns
``write_pos`` and the reader owns ``read_pos``, each in its own cache line, so neither side ever
writes what the other writes. A frame is published by storing ``write_pos`` after its bytes, and
x86-64 keeps stores in order, so a reader that sees the new position sees the whole frame.

Either side may die and be replaced: the ring lives on in the file, a new reader continues from
``read_pos`` and a new writer from ``write_pos``. A reader that attaches bumps ``reader_epoch`` so
the writer can tell that frames it handed to the previous reader may have been lost with it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time
from pathlib import Path

import msgspec

MAGIC = 0x434F4E464C555852  # "CONFLUXR"
HEADER_BYTES = 4096
FRAME_HEADER = struct.Struct("<I")
WRAP_MARKER = 0xFFFFFFFF
ALIGN = 8
# Header words (8 bytes each); each hot counter sits in its own 64-byte cache line.
W_MAGIC, W_CAPACITY, W_WRITE_POS, W_READ_POS, W_READER_EPOCH, W_WRITER_EPOCH = 0, 1, 8, 16, 24, 32


class RingFull(Exception):
    """The frame does not fit now; the reader has to catch up first."""


class FrameTooLarge(ValueError):
    """The frame can never fit in this ring."""


class RingSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to attach to a ring: the file and the two inherited eventfds."""

    name: str
    path: str
    capacity: int
    data_fd: int   # writer -> reader: "there is something to read"
    space_fd: int  # reader -> writer: "there is room again"


def create_ring(directory: str | os.PathLike, name: str, capacity: int) -> RingSpec:
    """Supervisor side, before fork: make the backing file and the eventfds. Maps nothing."""
    if capacity % ALIGN or capacity < 1024:
        raise ValueError("capacity must be a multiple of 8 and at least 1024 bytes")
    path = Path(directory) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, HEADER_BYTES + capacity)
        os.pwrite(fd, struct.pack("<QQ", MAGIC, capacity), 0)
    finally:
        os.close(fd)
    flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
    data_fd, space_fd = os.eventfd(0, flags), os.eventfd(0, flags)
    os.set_inheritable(data_fd, True)
    os.set_inheritable(space_fd, True)
    return RingSpec(name=name, path=str(path), capacity=capacity, data_fd=data_fd, space_fd=space_fd)


def destroy_ring(spec: RingSpec) -> None:
    """Supervisor side, at exit: remove the file and close the eventfds."""
    for fd in (spec.data_fd, spec.space_fd):
        with contextlib.suppress(OSError):
            os.close(fd)
    Path(spec.path).unlink(missing_ok=True)


class _RingEnd:
    """What both ends share: the mapping, the header words and the wake-up helpers."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        fd = os.open(spec.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, HEADER_BYTES + spec.capacity)
        finally:
            os.close(fd)
        self._header = memoryview(self._map)[:HEADER_BYTES].cast("Q")
        self._data = memoryview(self._map)[HEADER_BYTES:]
        if self._header[W_MAGIC] != MAGIC or self._header[W_CAPACITY] != spec.capacity:
            raise ValueError(f"{spec.path} is not a ring of {spec.capacity} bytes")
        self.capacity = spec.capacity

    @property
    def used_bytes(self) -> int:
        return self._header[W_WRITE_POS] - self._header[W_READ_POS]

    @property
    def reader_epoch(self) -> int:
        return self._header[W_READER_EPOCH]

    def close(self) -> None:
        self._header.release()
        self._data.release()
        self._map.close()

    @staticmethod
    def _drain(fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)

    @staticmethod
    def _wait(fd: int, timeout_s: float | None) -> bool:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)


def max_frame_bytes(capacity: int) -> int:
    """The largest frame a ring of ``capacity`` bytes takes: half of it, so a frame that does not fit the
    tail can always start again at the front of an empty ring."""
    return capacity // 2 - FRAME_HEADER.size


def _padded(size: int) -> int:
    return (FRAME_HEADER.size + size + ALIGN - 1) & ~(ALIGN - 1)


class RingWriter(_RingEnd):
    """The producing end. Used by exactly one process at a time."""

    def __init__(self, spec: RingSpec) -> None:
        super().__init__(spec)
        self._header[W_WRITER_EPOCH] += 1
        self.max_frame_bytes = max_frame_bytes(spec.capacity)

    def try_write(self, payload: bytes | bytearray | memoryview) -> None:
        """Append one frame or raise RingFull; never blocks."""
        size = len(payload)
        if size > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame_bytes}")
        header, capacity = self._header, self.capacity
        write_pos, read_pos = header[W_WRITE_POS], header[W_READ_POS]
        index = write_pos % capacity
        needed = _padded(size)
        tail_room = capacity - index
        skip = tail_room if tail_room < needed else 0  # frames never straddle the end
        if write_pos + skip + needed - read_pos > capacity:
            raise RingFull
        if skip:  # positions are 8-aligned, so the tail always has room for the marker
            FRAME_HEADER.pack_into(self._data, index, WRAP_MARKER)
            index = 0
        FRAME_HEADER.pack_into(self._data, index, size)
        start = index + FRAME_HEADER.size
        self._data[start:start + size] = payload
        header[W_WRITE_POS] = write_pos + skip + needed  # publish after the bytes
        os.eventfd_write(self.spec.data_fd, 1)

    def write(self, payload: bytes | bytearray | memoryview, timeout_s: float | None = None) -> bool:
        """Append one frame, waiting for room up to ``timeout_s``; False if it timed out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                self.try_write(payload)
                return True
            except RingFull:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Clear the wake-up, then try once more before sleeping: room the reader made just
                # before the clear would otherwise go unnoticed until the timeout (forever without one).
                self._drain(self.spec.space_fd)
                with contextlib.suppress(RingFull):
                    self.try_write(payload)
                    return True
                self._wait(self.spec.space_fd, remaining)

    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def wait_fd(self) -> int:
        """Readable when the reader has made room."""
        return self.spec.space_fd


class RingReader(_RingEnd):
    """The consuming end. Attaching announces a new reader incarnation through ``reader_epoch``."""

    def __init__(self, spec: RingSpec) -> None:
        super().__init__(spec)
        self._header[W_READER_EPOCH] += 1

    def read(self) -> bytes | None:
        """The next frame as bytes (copied out, so it stays valid), or None if the ring is empty."""
        frame = self._take()
        if frame is not None:
            os.eventfd_write(self.spec.space_fd, 1)
        return frame

    def _take(self) -> bytes | None:
        header, capacity = self._header, self.capacity
        read_pos = header[W_READ_POS]
        if header[W_WRITE_POS] == read_pos:
            return None
        index = read_pos % capacity
        size = FRAME_HEADER.unpack_from(self._data, index)[0]
        if size == WRAP_MARKER:
            read_pos += capacity - index
            index = 0
            size = FRAME_HEADER.unpack_from(self._data, 0)[0]
        start = index + FRAME_HEADER.size
        frame = bytes(self._data[start:start + size])
        header[W_READ_POS] = read_pos + _padded(size)
        return frame

    def read_many(self, max_frames: int) -> list[bytes]:
        """Up to ``max_frames`` frames; clears the wake-up first so no signal is lost."""
        self._drain(self.spec.data_fd)
        frames = []
        while len(frames) < max_frames:
            frame = self._take()
            if frame is None:
                break
            frames.append(frame)
        if frames:
            os.eventfd_write(self.spec.space_fd, 1)
        return frames

    def wait(self, timeout_s: float | None) -> bool:
        """Block until the writer signals or the timeout passes; True if something may be there."""
        if self.used_bytes:
            return True
        return self._wait(self.spec.data_fd, timeout_s)

    @property
    def wait_fd(self) -> int:
        """Readable when the writer has published frames."""
        return self.spec.data_fd
