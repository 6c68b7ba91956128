#!/usr/bin/env python3
"""Seed corpus of tests/fuzz/fuzz_handshake.c: valid encodings of each
message it feeds to a validator (first byte: which one, see the target).
Layouts follow ipc/ipc_abi.h (ABI version 3); rerun after an ABI change:
    tests/fuzz/mkseeds_handshake.py tests/fuzz/corpus_handshake
"""
import os
import struct
import sys

MAGIC = 0x4E4F4752
ABI = 3


def hello():
    return struct.pack("<IIII", MAGIC, ABI, 0, 0)


def welcome(status=0, session=7, region_bytes=8192, reason=b""):
    return struct.pack("<IIiIQ48s", MAGIC, ABI, status, session, region_bytes, reason)


def region_hdr(sq, cq, n_slots, slot_in, slot_out, session=1):
    """The header ipc_region_create writes for this config (normal pages)."""
    sq_off = 4096
    cq_off = sq_off + 192 + sq * 64
    slots_off = cq_off + 192 + cq * 64
    stride = 64 + slot_in + slot_out
    end = slots_off + n_slots * stride
    size = (end + 4095) // 4096 * 4096
    hdr = struct.pack("<IIQIIIIIIQQQQ", MAGIC, ABI, size, sq, cq, n_slots, slot_in, slot_out,
                      session, sq_off, cq_off, slots_off, stride)
    return size, hdr


def region_seed(sq, cq, n_slots, slot_in, slot_out):
    size, hdr = region_hdr(sq, cq, n_slots, slot_in, slot_out)
    pages = size // 4096
    # [pages-1][tail: none][seals: the three a region needs]
    return bytes([2, pages - 1, 0, 0]) + hdr


def sqe(opcode, slot, user_data, in_off, in_len):
    return struct.pack("<BBHIQII32s8s", opcode, 0, 0, slot, user_data, in_off, in_len,
                       b"", b"")


SEEDS = {
    "hello": b"\x00" + hello(),
    "welcome_region_fd": b"\x01\x01" + welcome(),
    "welcome_region_and_wake_fd": b"\x01\x02" + welcome(),
    "welcome_refused": b"\x01\x00" + welcome(status=-13, region_bytes=0,
                                             reason=b"uid 1000 not allowed"),
    "region_small": region_seed(4, 8, 2, 64, 128),
    "region_default_rings": region_seed(256, 512, 4, 1024, 4096),
    "region_no_slots": region_seed(2, 2, 0, 0, 0),
    "sqe_ping": b"\x03" + struct.pack("<HH", 8, 16) + sqe(1, 3, 42, 0, 4),
    "sqe_generate_window": b"\x03" + struct.pack("<HH", 64, 256) + sqe(2, 63, 7, 64, 16320),
    "ring_push_pop": b"\x04\x02" + struct.pack("<II", 0, 0) + bytes([3, 3, 0, 0, 5, 2, 0x42]),
    "ring_wrapped": b"\x04\x03" + struct.pack("<II", 0xFFFFFFFE, 0xFFFFFFFE) + bytes([3, 5, 2, 0]),
}

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                          "corpus_handshake")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
