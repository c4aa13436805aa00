"""The shared-memory SPSC ring (ipc/shm.py): integrity, wrap-around, full and empty rings, and readers
and writers in real processes, including a reader killed with SIGKILL mid-stream."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import struct
import tempfile
import time
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64

from conflux.ipc.shm import (
    FRAME_HEADER,
    HEADER_BYTES,
    W_WRITE_POS,
    FrameTooLarge,
    RingFull,
    RingReader,
    RingSpec,
    RingWriter,
    _padded,
    create_ring,
    destroy_ring,
)

SEQ = struct.Struct("<I")
FUZZ = settings(max_examples=60, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def ring(capacity: int = 1024) -> Iterator[RingSpec]:
    with tempfile.TemporaryDirectory(prefix="conflux-ring-") as directory:
        spec = create_ring(directory, "ring", capacity)
        try:
            yield spec
        finally:
            destroy_ring(spec)


@contextlib.contextmanager
def ends(capacity: int = 1024) -> Iterator[tuple[RingWriter, RingReader]]:
    with ring(capacity) as spec:
        writer, reader = RingWriter(spec), RingReader(spec)
        try:
            yield writer, reader
        finally:
            writer.close()
            reader.close()


def numbered(seq: int, size: int) -> bytes:
    """A frame that says which one it is and whose body can be checked: seq, then seeded bytes."""
    body = random.Random(seq).randbytes(max(0, size - SEQ.size))
    return (SEQ.pack(seq) + body)[:max(size, SEQ.size)]


def seq_of(frame: bytes) -> int:
    assert frame == numbered(SEQ.unpack_from(frame)[0], len(frame)), "frame corrupted"
    return SEQ.unpack_from(frame)[0]


# -- one process: integrity, wrap-around, full, empty ----------------------------------------------


@FUZZ
@given(ops=st.lists(st.one_of(st.integers(0, 508), st.just("read"), st.just("read_many")), max_size=120),
       capacity=st.sampled_from([1024, 1032, 1536]))
def test_frames_of_random_sizes_come_out_intact_and_in_order(ops: list, capacity: int) -> None:
    """Against a model queue: every accepted frame comes out once, in order, byte for byte; a
    refused frame really would not have fitted."""
    with ends(capacity) as (writer, reader):
        model: deque[bytes] = deque()
        for op in ops:
            if op == "read":
                assert reader.read() == (model.popleft() if model else None)
            elif op == "read_many":
                assert reader.read_many(3) == [model.popleft() for _ in range(min(3, len(model)))]
            else:
                payload = os.urandom(min(op, writer.max_frame_bytes))
                used, padded = writer.used_bytes, _padded(len(payload))
                try:
                    writer.try_write(payload)
                    model.append(payload)
                    assert used + padded <= writer.capacity
                except RingFull:
                    # It needs its padded size, plus at most padded - 8 bytes skipped at the end.
                    assert used + 2 * padded - 8 > writer.capacity
                assert writer.used_bytes <= writer.capacity
        assert reader.read_many(len(model) + 1) == list(model)
        assert reader.used_bytes == 0


def test_positions_wrap_many_times_around_the_buffer() -> None:
    with ends(1024) as (writer, reader):
        sizes = [random.Random(7).randint(0, 300) for _ in range(400)]
        for seq, size in enumerate(sizes):
            writer.try_write(numbered(seq, size))
            assert seq_of(reader.read()) == seq
        assert writer._header[W_WRITE_POS] > 20 * writer.capacity  # many laps, so the wrap marker path ran many times


def test_a_frame_that_does_not_fit_the_tail_starts_at_the_front() -> None:
    with ends(2048) as (writer, reader):
        writer.try_write(b"a" * 1000)       # 1008 padded
        writer.try_write(b"b" * 900)        # 904 padded: 136 bytes of tail left
        assert reader.read_many(2) == [b"a" * 1000, b"b" * 900]
        writer.try_write(b"c" * 200)        # does not fit the tail: a wrap marker, then offset 0
        assert writer.used_bytes == 136 + 208
        assert reader.read() == b"c" * 200
        assert writer.used_bytes == 0


def advance_to(writer: RingWriter, reader: RingReader, index: int) -> None:
    """Move both positions of an empty ring to ``index`` with filler frames that never wrap."""
    largest_step = (writer.max_frame_bytes + FRAME_HEADER.size) // 8 * 8
    while (here := writer._header[W_WRITE_POS] % writer.capacity) != index:
        step = min((index - here) % writer.capacity, writer.capacity - here, largest_step)
        writer.try_write(b"f" * (step - FRAME_HEADER.size))
        reader.read()


@pytest.mark.parametrize("capacity", [1024, 1032, 4096])
def test_an_empty_ring_takes_the_largest_frame_wherever_its_positions_are(capacity: int) -> None:
    with ends(capacity) as (writer, reader):
        largest = b"L" * writer.max_frame_bytes
        for index in range(0, capacity, 8 if capacity < 4096 else 40):
            advance_to(writer, reader, index)
            writer.try_write(largest)
            assert reader.read() == largest
            assert writer.used_bytes == 0


def test_frame_too_large_is_refused_before_anything_is_written() -> None:
    with ends(1024) as (writer, reader):
        with pytest.raises(FrameTooLarge):
            writer.try_write(b"x" * (writer.max_frame_bytes + 1))
        with pytest.raises(FrameTooLarge):
            writer.write(b"x" * (writer.max_frame_bytes + 1), timeout_s=0)
        assert writer.used_bytes == 0 and reader.read() is None


def test_full_ring_refuses_then_accepts_after_a_read() -> None:
    with ends(1024) as (writer, reader):
        frame = b"z" * 100               # 104 padded: 9 fit in 1024 bytes
        for _ in range(9):
            writer.try_write(frame)
        with pytest.raises(RingFull):
            writer.try_write(frame)
        started = time.monotonic()
        assert writer.write(frame, timeout_s=0.05) is False
        assert 0.04 <= time.monotonic() - started < 2.0
        assert reader.read() == frame
        assert writer.write(frame, timeout_s=0) is True
        assert len(reader.read_many(100)) == 9


def test_empty_ring_reads_nothing_and_wait_times_out() -> None:
    with ends(1024) as (writer, reader):
        assert reader.read() is None
        assert reader.read_many(10) == []
        assert reader.wait(0) is False
        writer.try_write(b"hello")
        assert reader.wait(0) is True
        assert select.select([reader.wait_fd], [], [], 0)[0] == [reader.wait_fd]
        assert reader.read_many(10) == [b"hello"]
        assert select.select([reader.wait_fd], [], [], 0)[0] == []  # read_many cleared the wake-up
        assert select.select([writer.wait_fd], [], [], 0)[0] == [writer.wait_fd]  # and signalled room


def test_zero_length_frames_are_frames() -> None:
    with ends(1024) as (writer, reader):
        writer.try_write(b"")
        writer.try_write(b"")
        assert reader.read_many(5) == [b"", b""]


@pytest.mark.parametrize("capacity", [1032, 4096])
def test_write_notices_room_made_just_before_it_clears_the_wake_up(capacity: int) -> None:
    """Regression: write() cleared the reader's wake-up and then, unless twice the frame was free,
    slept on it; room made in between went unnoticed until the timeout, or forever without one."""
    with ring(capacity) as spec:
        reader = RingReader(spec)
        frame = b"w" * (capacity // 4 - 8)
        filler = RingWriter(spec)
        while True:
            try:
                filler.try_write(frame)
            except RingFull:
                break

        class ReaderRacesTheDrain(RingWriter):
            def _drain(self, fd: int) -> None:
                if fd == spec.space_fd and reader.used_bytes:
                    reader.read()  # the reader makes room (and signals) just before the drain
                super()._drain(fd)

        writer = ReaderRacesTheDrain(spec)
        started = time.monotonic()
        assert writer.write(frame, timeout_s=3.0) is True
        assert time.monotonic() - started < 1.0
        for end in (reader, filler, writer):
            end.close()


def test_a_new_writer_continues_from_write_pos() -> None:
    with ring(1024) as spec:
        reader, first = RingReader(spec), RingWriter(spec)
        first.try_write(b"one")
        first.close()  # the writer process dies; the ring lives on in the file
        second = RingWriter(spec)
        second.try_write(b"two")
        assert reader.read_many(5) == [b"one", b"two"]
        reader.close()
        second.close()


def test_reader_epoch_counts_reader_attachments() -> None:
    with ring(1024) as spec:
        writer = RingWriter(spec)
        assert writer.reader_epoch == 0
        readers = [RingReader(spec)]
        assert writer.reader_epoch == 1
        readers.append(RingReader(spec))
        assert writer.reader_epoch == 2 and readers[0].reader_epoch == 2
        for end in (writer, *readers):
            end.close()


def test_create_ring_checks_capacity_and_destroy_removes_everything() -> None:
    with tempfile.TemporaryDirectory() as directory:
        for bad in (1000, 1028, 0):
            with pytest.raises(ValueError, match="capacity"):
                create_ring(directory, "bad", bad)
        spec = create_ring(directory, "ring", 2048)
        assert os.path.getsize(spec.path) == HEADER_BYTES + 2048
        destroy_ring(spec)
        assert not os.path.exists(spec.path)
        for fd in (spec.data_fd, spec.space_fd):
            with pytest.raises(OSError):
                os.fstat(fd)


def test_attaching_to_a_file_that_is_not_such_a_ring_fails() -> None:
    with ring(1024) as spec:
        with pytest.raises(ValueError, match="not a ring"):
            RingReader(RingSpec(spec.name, spec.path, 512, spec.data_fd, spec.space_fd))
        with open(spec.path, "r+b") as handle:
            handle.write(b"NOTARING")
        with pytest.raises(ValueError, match="not a ring"):
            RingWriter(spec)


# -- real processes ---------------------------------------------------------------------------------


def fork(child) -> int:
    """Run ``child()`` in a forked process that never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit within {timeout_s}s")


def read_all(fd: int, timeout_s: float = 10.0) -> bytes:
    """Everything from a pipe until EOF, with a deadline."""
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    raise AssertionError("pipe did not reach EOF in time")


def reader_child(spec: RingSpec, report_fd: int, stop_after: int | None) -> None:
    """A reader process: report each frame's sequence number through the pipe right after reading
    it, one frame at a time, so at most one frame is ever read but unreported."""
    reader = RingReader(spec)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        frame = reader.read()
        if frame is None:
            reader.wait(0.05)
            continue
        seq = seq_of(frame)
        os.write(report_fd, SEQ.pack(seq))
        if seq == stop_after:
            return


def test_writer_and_reader_in_two_processes_agree_on_a_checksum() -> None:
    count = 3000
    with ring(8192) as spec:
        done_r, done_w = os.pipe()

        def writer_child() -> None:
            os.close(done_r)
            writer, digest = RingWriter(spec), xxh3_64()
            rng = random.Random(11)
            for _ in range(count):
                frame = rng.randbytes(rng.randint(0, 700))
                assert writer.write(frame, timeout_s=10)
                digest.update(SEQ.pack(len(frame)) + frame)
            os.write(done_w, digest.hexdigest().encode())

        pid = fork(writer_child)
        os.close(done_w)
        reader, digest, received = RingReader(spec), xxh3_64(), 0
        deadline = time.monotonic() + 20
        while received < count and time.monotonic() < deadline:
            for frame in reader.read_many(64):
                digest.update(SEQ.pack(len(frame)) + frame)
                received += 1
            reader.wait(0.05)
        assert received == count
        assert read_all(done_r).decode() == digest.hexdigest()
        assert reap(pid) == 0
        os.close(done_r)
        reader.close()


def test_a_reader_killed_mid_stream_is_replaced_without_losing_or_repeating_frames() -> None:
    """SIGKILL the reading process while the writer is writing; a new reader continues from
    read_pos. Only the frame in the dead reader's hands may be lost to it (never twice for others)."""
    total, kill_after = 2000, 700
    sizes = [random.Random(3).randint(0, 200) for _ in range(total)]
    with ring(2048) as spec:
        writer = RingWriter(spec)
        first_r, first_w = os.pipe()
        first = fork(lambda: reader_child(spec, first_w, None))
        os.close(first_w)
        for seq in range(kill_after):
            assert writer.write(numbered(seq, sizes[seq]), timeout_s=10)
        os.kill(first, signal.SIGKILL)  # mid-stream: it is still reading what we wrote
        assert os.WIFSIGNALED(reap(first))
        seen_by_first = [s for (s,) in SEQ.iter_unpack(read_all(first_r))]
        os.close(first_r)
        assert writer.reader_epoch == 1

        second_r, second_w = os.pipe()
        second = fork(lambda: reader_child(spec, second_w, total - 1))
        os.close(second_w)
        for seq in range(kill_after, total):
            assert writer.write(numbered(seq, sizes[seq]), timeout_s=10)
        seen_by_second = [s for (s,) in SEQ.iter_unpack(read_all(second_r))]
        assert reap(second) == 0
        os.close(second_r)
        assert writer.reader_epoch == 2  # the writer can tell the reader was replaced
        writer.close()

    assert kill_after // 2 < len(seen_by_first) <= kill_after
    assert seen_by_first == list(range(len(seen_by_first)))
    resumed_at = seen_by_second[0]
    # The dead reader may have taken one frame (read_pos moved) without reporting it.
    assert resumed_at in (len(seen_by_first), len(seen_by_first) + 1)
    assert seen_by_second == list(range(resumed_at, total))


def test_reader_epoch_tells_the_writer_a_reader_process_replaced_the_old_one() -> None:
    with ring(1024) as spec:
        writer = RingWriter(spec)
        before = writer.reader_epoch
        attached_r, attached_w = os.pipe()

        def attach_and_hang() -> None:
            RingReader(spec)
            os.write(attached_w, b"!")
            time.sleep(30)

        pid = fork(attach_and_hang)
        assert select.select([attached_r], [], [], 10)[0]
        os.kill(pid, signal.SIGKILL)
        reap(pid)
        assert writer.reader_epoch == before + 1
        os.close(attached_r)
        os.close(attached_w)
        writer.close()
