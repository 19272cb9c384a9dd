"""Held-out evaluation rows, decided by a row's id alone.

Training builders and evaluation tasks read the same shipped files (multi-hop evidence, tool
calls); one rule decides which rows only evaluation may see: a row is held out when the CRC-32
of "<collection>/<row id>" falls in bucket 0 of HELDOUT_BUCKETS (a quarter of the rows). It
needs no list of ids, does not depend on which file or order a row was read in (the hub copy of
a dataset splits the same way), and is the same on every machine.
"""

from __future__ import annotations

import zlib

HELDOUT_BUCKETS = 4
MULTIHOP = "multihop"  # 2WikiMultihopQA, HotpotQA and MuSiQue rows (ids are unique across them)
TOOL_CALLS = "bfcl"  # Berkeley Function Calling Leaderboard rows


def is_heldout(collection: str, row_id: str) -> bool:
    """Whether the row `row_id` of `collection` is reserved for evaluation."""
    return zlib.crc32(f"{collection}/{row_id}".encode()) % HELDOUT_BUCKETS == 0
