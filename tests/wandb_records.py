"""Reading an offline wandb run's transaction log (run-<id>.wandb) in tests: wandb ships no Python reader.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of records, each
a 7-byte header (CRC32 4, length 2 little-endian, type 1: full/first/middle/last) and its bytes; a record's
pieces, joined, are one serialized `wandb_internal_pb2.Record`."""

import struct

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pieces = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        body = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pieces = body if kind in (FULL, FIRST) else pieces + body
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pieces)
            yield record
