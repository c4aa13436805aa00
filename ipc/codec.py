"""Encoders and decoders for every channel, built once per process and reused.

msgspec's encoders keep an internal buffer; building one per call throws that away. The module-level
instances here are created at import, which happens before fork; they hold no OS resources, so they
are safe to share with children.
"""

from __future__ import annotations

import msgspec

from conflux.ipc.messages import AckFrame, Batch, BatchHead, ControlMessage, DeadLetter, RingFrame

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
