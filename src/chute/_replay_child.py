"""The checkpoint child: the core's state at a log position, rebuilt from the data directory's files alone.

Run by chute._forked_snapshot as `python -m chute._replay_child DIRECTORY END_REF NOW` (a new program, not a fork:
it shares no memory pages with the broker, so the broker's loop takes no copy-on-write faults while it works). It
reads the stored checkpoint and the records after it up to END_REF without writing anything
(storage/file/readonly.py), replays them as recovery does (`BrokerCore.restore`, at the broker's clock NOW), and
writes the snapshot of that state, compressed, to its standard output. Exit status 0 means the output is whole;
anything else (a file it cannot read, a record it cannot apply) is reported on standard error with status 1, and
the broker builds the snapshot itself instead.

Invariant: the state it rebuilds is what recovery would rebuild from the same files cut at END_REF, which is the
broker's durable state at END_REF (every record before it was written before this started); reference counts,
leases and statistics are not in a snapshot, so the child does not keep them.
"""

from __future__ import annotations

import os
import sys
import zlib

COMPRESS_LEVEL = 1  # (as the forked child: ~250 ms per million entries; level 6 is 5x slower for 4% less)


def build(directory: str, end_ref: int, now: float) -> bytes:
    """The compressed snapshot of the state at `end_ref` of the log in `directory`."""
    from chute.core.broker import BrokerCore
    from chute.core.recovery import _Uncounted
    from chute.storage.file.fs import OsFs
    from chute.storage.file.readonly import checkpoint_and_records

    snapshot, records = checkpoint_and_records(OsFs(), directory, end_ref)
    core = BrokerCore(_Uncounted())  # (no reference counts: nothing is ever deleted from here)
    core.restore(snapshot, records, now)
    return zlib.compress(core.snapshot(), COMPRESS_LEVEL)


def main(argv: list[str]) -> int:
    try:
        directory, end_ref, now = argv[1], int(argv[2]), float(argv[3])
        os.nice(10)  # on a busy machine the broker comes first
        image = build(directory, end_ref, now)
    except Exception as exc:
        print(f"chute checkpoint child: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    view = memoryview(image)
    out = sys.stdout.fileno()
    while view:
        view = view[os.write(out, view) :]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
