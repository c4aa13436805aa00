"""Encoders and decoders for every channel, built once per process and reused.

msgspec's encoders keep an internal buffer; building one per call throws that away. The module-level
instances here are created at import, which happens before fork; they hold no OS resources, so they
are safe to share with children.
"""

from __future__ import annotations

import msgspec

from conflux.ipc.messages import AckFrame, Batch, BatchHead, ControlMessage, DeadLetter, MergeBatch, Position, RingFrame
from conflux.ipc.shm import max_frame_bytes

json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()

batch_decoder = msgspec.json.Decoder(Batch)
batch_head_decoder = msgspec.json.Decoder(BatchHead)
ring_frame_decoder = msgspec.json.Decoder(RingFrame)
ack_frame_decoder = msgspec.msgpack.Decoder(AckFrame)
control_decoder = msgspec.msgpack.Decoder(ControlMessage)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


def encode_batch(batch: Batch) -> bytes:
    return json_encoder.encode(batch)


def decode_batch(payload: bytes | memoryview) -> Batch:
    return batch_decoder.decode(payload)


def decode_batch_head(payload: bytes | memoryview) -> BatchHead:
    return batch_head_decoder.decode(payload)


def encode_ring_frame(frame: object) -> bytes:
    """Consumer -> merger frames are JSON because they carry raw JSON records."""
    return json_encoder.encode(frame)


def encode_ack_frame(frame: object) -> bytes:
    return msgpack_encoder.encode(frame)


def encode_control(message: object) -> bytes:
    return msgpack_encoder.encode(message)


def encode_dead_letter(entry: DeadLetter) -> bytes:
    return json_encoder.encode(entry)


# ---------------------------------------------------------------------------------------------
# Frame limits: how large a Batch may be to travel in one ring frame. Upper bounds, exact enough to
# cut batches with, computed without encoding the batch.

# Per record, besides the record's own bytes: its key (values inside the record, so at most twice the
# record's length once a composite key's separators are escaped, +2 quotes for an integer key), its
# updated text (a value of the record, or an epoch number's ISO 8601 text, at most 32 bytes),
# updated_us and the key hash (at most 20 digits each), the content hash (16 hex digits and quotes),
# the delete flag ("false") and seven commas.
RECORD_BYTES_FACTOR = 4
ROW_OVERHEAD_BYTES = 2 + 32 + 20 + 20 + 18 + 5 + 7


# The largest batch Conflux publishes, whatever the ring: Kafka topics are made to take 16 MiB messages
# (log/kafka/settings.py MAX_MESSAGE_BYTES), key and headers included.
MAX_LOG_BATCH_BYTES = 8 << 20


def row_bytes_bound(record_bytes: int) -> int:
    """The most bytes a record of ``record_bytes`` adds to an encoded Batch, all its columns included."""
    return RECORD_BYTES_FACTOR * record_bytes + ROW_OVERHEAD_BYTES


def batch_header_bytes(source: str, sync: str) -> int:
    """An encoded Batch of ``source`` with no records, with the longest message id and creation time."""
    return len(encode_batch(Batch("f" * 12 + "-" + "f" * 16, source, sync, 2**63 - 1, [], [], [], [], [], [], [])))


def merge_frame_overhead_bytes(topic: str) -> int:
    """What a MergeBatch frame adds round its Batch: consumer, generation and position at their largest."""
    frame = MergeBatch(2**16 - 1, 2**64 - 1, Position(topic, 2**31 - 1, 2**63 - 1), msgspec.Raw(b"0"))
    return len(encode_ring_frame(frame)) - 1


def batch_room_bytes(ring_bytes: int, topic: str) -> int:
    """The largest encoded Batch from ``topic`` that one frame of a ``ring_bytes`` data ring carries."""
    return max_frame_bytes(ring_bytes) - merge_frame_overhead_bytes(topic)
