"""The target service's journal: the crash-safe record of every key and paid answer, and its mark.

Plain Python (no Ray, no HTTP). ``drmi_ray.ledger.Ledger`` is its one writer (``Journal``);
``read_journal`` reads it, also while a ledger appends. The attacker's own record of what it
asked is another thing (``acquisition.AttackerRecord``).

**The journal** is the single source of truth. One record per line, ``"<crc32 hex> <json>\\n"``,
appended and fsynced before the answer leaves the service. Format 2 (``"journal": 2`` in the
first record; a journal of another format, e.g. an older drmi-ray's format 1, is refused in one
line): every record carries ``seq`` (0, 1, 2, ...) and ``prev``, the SHA-256 of the line before
it (64 zeros for the first), so records cannot go missing or move unseen:

- ``{"type": "service", ...}``: the first record: the target it was written for (checkpoint
  SHA-256, output kind). A journal written for another target is refused (``check_service``).
- ``{"type": "key", "name", "budget", "rate_limit", "burst", "prada_delta"}``: a client.
- ``{"type": "answer", "key", "rid", "n", "digest", "labels", "shown"[, "images"]}``: one paid
  request: what it asked (SHA-256 of the images), the target's labels, the answer the client was
  shown, and the images themselves when the key has a PRADA detector (so detection is rebuilt
  from the journal after a restart).

**The high-water mark** (``<journal>.mark``, beside it): ``seq`` and SHA-256 of the last record
written, rewritten in place and fsynced after each append (one write of 160 bytes at offset 0,
within one disk sector, so a crash leaves the old mark or the new one).
What a truncation cannot forge is what tells a crash from damage. On start the journal is
replayed and:

- a torn last line (no newline: a crash mid-write) is cut off the file; it held an answer the
  client never received, and a retry with the same request id asks again;
- one complete record past the mark (a crash between the record's fsync and the mark's) is
  kept and sealed;
- refused with ``JournalCorrupt`` (one line naming the file, and the line when there is one):
  a complete line with a bad checksum or bad JSON anywhere, including the last; a record out of
  sequence or not chained to the line before; fewer records than the mark sealed (truncated at a
  line boundary, emptied, deleted); a sealed record that differs from the mark's hash; a damaged
  mark; more than one record past the mark (a missing or old mark).

(Restoring an older journal *together with* its older mark is not detected: keep run folders
where clients cannot write.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import zlib

JOURNAL_FORMAT = 2  # 2: sequence numbers, a hash chain and the high-water mark file; 1 is refused
GENESIS = "0" * 64  # the ``prev`` of the first record
MARK_BYTES = 160  # the high-water mark file's fixed size


class JournalCorrupt(ValueError):
    """A journal or mark damaged as the module doc says (not a crash's torn tail): no ledger starts on it."""


def _line(record: dict) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def _parse(line: bytes) -> dict | None:
    """The record in one journal line (without its newline), or None when damaged."""
    crc, _, body = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "type" in record else None


def mark_path(path: str) -> str:
    """The journal's high-water mark file, beside it."""
    return path + ".mark"


def _damaged(path: str, what: str) -> JournalCorrupt:
    return JournalCorrupt(f"target journal {path}{what}; the service will not start on it: restore it and "
                          f"{os.path.basename(mark_path(path))} from a backup, or move both away and start a new "
                          "run folder")


def read_mark(path: str) -> dict | None:
    """The high-water mark of the journal at ``path`` (``{"seq", "sha256"}`` of the last record
    known written), or None when there is none; ``JournalCorrupt`` when it is damaged."""
    try:
        with open(mark_path(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if not data:  # made, not yet written (a crash as a new journal starts): no mark
        return None
    mark = _parse(data[:-1]) if len(data) == MARK_BYTES and data.endswith(b"\n") else None
    if (mark is None or mark["type"] != "mark" or type(mark.get("seq")) is not int
            or not isinstance(mark.get("sha256"), str)):
        raise _damaged(path, f": its high-water mark {mark_path(path)} is damaged")
    return mark


def _write_mark(fd: int, seq: int, sha256: str) -> None:
    # one write of MARK_BYTES at offset 0, inside one disk sector: a crash leaves the old mark or
    # the new one (a rename instead would cost two more fsyncs per answer)
    body = json.dumps({"type": "mark", "journal": JOURNAL_FORMAT, "seq": seq, "sha256": sha256},
                      sort_keys=True, separators=(",", ":")).ljust(MARK_BYTES - 10)  # JSON allows the padding
    os.pwrite(fd, f"{zlib.crc32(body.encode()):08x} {body}\n".encode(), 0)
    os.fdatasync(fd)


def _scan(path: str, live: bool = False):
    """``(records, SHA-256 of the last complete line, bytes of complete lines, file size, the
    mark's seq)`` of the journal at ``path``, checked as the module doc says. ``live``: a running
    ledger appends meanwhile, so the journal may run ahead of the mark (read first) by any count."""
    mark = read_mark(path)
    data = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    sealed = -1 if mark is None else mark["seq"]
    lines = data.split(b"\n")
    lines.pop()  # the piece after the last newline: b"", or a record torn by a crash mid-write
    records, last, good = [], GENESIS, 0
    for number, line in enumerate(lines, start=1):
        record = _parse(line)
        if record is None:
            raise _damaged(path, f" line {number}: damaged record (checksum or JSON) in a complete line")
        if number == 1 and record.get("journal") != JOURNAL_FORMAT:
            found = record.get("journal", 1)
            raise JournalCorrupt(f"target journal {path} is in format {found!r}, this drmi-ray reads format "
                                 f"{JOURNAL_FORMAT} only; finish that run with the drmi-ray that wrote it, or start "
                                 "a new run folder")
        if record.get("seq") != number - 1 or record.get("prev") != last:
            raise _damaged(path, f" line {number}: out of sequence (records before it are missing or moved)")
        last = hashlib.sha256(line + b"\n").hexdigest()
        if number - 1 == sealed and last != mark["sha256"]:
            raise _damaged(path, f" line {number}: differs from the record its high-water mark sealed")
        records.append(record)
        good += len(line) + 1
    have = len(records) - 1  # seq of the last complete record
    if have < sealed:
        raise _damaged(path, f": it ends at record {have} but its high-water mark sealed record {sealed} "
                             "(truncated or emptied: paid answers would be refunded)")
    if have > sealed + 1 and not live:  # a crash between a record's fsync and its mark leaves exactly one
        raise _damaged(path, f": {have - sealed} records past its high-water mark (the mark is missing or old)")
    return records, last, good, len(data), sealed


def read_journal(path: str) -> list[dict]:
    """Every complete record of the journal at ``path``, in order, checked against its
    high-water mark (the module doc says what is refused with ``JournalCorrupt``); a torn last
    line is left out (``Journal`` cuts it off the file). Safe while a ledger appends to it."""
    live = False
    if os.path.exists(path):
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # a running ledger holds it
                live = True
    return _scan(path, live)[0]


def check_service(path: str, records: list[dict], service: dict) -> None:
    """Refuse a journal written for another target (its first record says which)."""
    if records and (records[0].get("type") != "service"
                    or {k: records[0].get(k) for k in service} != service):
        raise ValueError(f"target journal {path} was written for another target ({_describe(records[0])}); "
                         "use a new run folder for this target")


def _describe(record: dict) -> str:
    shown = [f"{k}={v}" for k, v in record.items() if k not in ("type", "time", "seq", "prev", "journal")]
    return ", ".join(shown) or "no service record"


class Journal:
    """Append-only, fsynced, one writer: an exclusive ``flock`` held while the ledger lives.

    ``append`` numbers each record (``seq``), chains it to the previous line (``prev``: its
    SHA-256), fsyncs it, then seals it in the high-water mark file.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "ab")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(f"target journal {path} is in use by another running service; "
                               "stop it first, or use another run folder") from None
        try:
            self.records, self._last, good, size, sealed = _scan(path)
            if good != size:  # cut the torn tail, so the next append starts on a clean line
                self._file.truncate(good)
                os.fsync(self._file.fileno())
            self._seq = len(self.records) - 1
            self._mark = os.open(mark_path(path), os.O_RDWR | os.O_CREAT, 0o644)
            if self._seq != sealed:  # the crash came between a record's fsync and its mark
                _write_mark(self._mark, self._seq, self._last)
            _fsync_folder(path)  # the mark file's own name, when it was just made
        except BaseException:
            self._file.close()
            raise

    def append(self, record: dict) -> None:
        seq = self._seq + 1
        record = {**record, "seq": seq, "prev": self._last, **({"journal": JOURNAL_FORMAT} if seq == 0 else {})}
        line, size = _line(record), os.fstat(self._file.fileno()).st_size
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:  # e.g. disk full: leave no partial line for the next append to follow
            self._file.truncate(size)
            raise
        self._seq, self._last = seq, hashlib.sha256(line).hexdigest()
        _write_mark(self._mark, seq, self._last)

    def close(self) -> None:
        os.close(self._mark)
        self._file.close()


def _fsync_folder(path: str) -> None:
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
