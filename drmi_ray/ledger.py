"""The target's ledger: API keys, spent budget, stored answers and PRADA, from a crash-safe journal.

Plain Python (no Ray, no HTTP); ``drmi_ray.service`` runs one ``Ledger`` as the single Serve
replica every model replica's answer goes through.

**The journal** is the single source of truth. One record per line, ``"<crc32 hex> <json>\\n"``,
appended and fsynced before the answer leaves the service. Format 2 (``"journal": 2`` in the
first record; a journal of another format, e.g. an older drmi-ray's format 1, is refused in one
line): every record carries ``seq`` (0, 1, 2, ...) and ``prev``, the SHA-256 of the line before
it (64 zeros for the first), so records cannot go missing or move unseen:

- ``{"type": "service", ...}``: the first record: the target it was written for (checkpoint
  SHA-256, output kind). A journal written for another target is refused.
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

A record is charged only when it is in the journal, together with its answer, so a crash can
lose an answer's *computation* but never a paid answer: the client retries with the same
request id and gets the stored answer, charged once. (Restoring an older journal *together
with* its older mark is not detected: keep run folders where clients cannot write.)

**Keys** are ``drk.<name>.<mac>`` where ``mac`` is an HMAC of the name under the operator key:
the same name always gives the same key (a rerun gets its clients' keys back) and no key is
stored anywhere. The operator key (``dro.<hex>``) is held by whoever started the service.

**A request** (``begin`` then ``commit`` or ``release``):

- ``rid``, the request id, is a string of 1-128 letters, digits and ``._:/-`` in every call
  (anything else, a number or a boolean included, is refused with 400, never coerced).
- ``begin(key, rid, n, digest)``: a request id already answered with the same images returns the
  stored answer (free); with other images it is refused (409). Otherwise the ``n`` images are
  *reserved* against the budget (refused whole, 402, if used + reserved + n > budget), and the
  rate limit is applied: a token bucket of ``rate_limit`` images/s holding at most ``burst``; a
  batch of ``n`` takes ``n`` tokens, so a batch larger than ``burst`` is refused (413: it could
  never pass) and one that finds too few tokens is refused with 429 and the seconds until they
  are there. The bucket never goes into debt: no request is answered beyond the rate.
- ``commit``: journal the answer (fsync), charge it, feed PRADA; a commit whose reservation was
  lost (the ledger restarted mid-request) is checked against the budget again. ``release``: drop a reservation
  whose computation failed (nothing charged). A reservation whose client never comes back lapses
  after ``PENDING_TIMEOUT_S``.

The rate limiter's tokens and refused requests are not journaled: after a restart a key's bucket
starts full, and the audit's refusals (kept in memory, the last ``REFUSALS_KEPT``) start empty.
"""

from __future__ import annotations

import base64
import collections
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
import zlib

import numpy as np

from .prada import PradaDetector

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEY = re.compile(r"^drk\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{32})$")
OPERATOR_KEY = re.compile(r"^dro\.[0-9a-f]{48}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
PENDING_TIMEOUT_S = 300.0  # a reservation nobody commits or releases lapses after this
REFUSALS_KEPT = 10000
JOURNAL_FORMAT = 2  # 2: sequence numbers, a hash chain and the high-water mark file; 1 is refused
GENESIS = "0" * 64  # the ``prev`` of the first record
MARK_BYTES = 160  # the high-water mark file's fixed size


class Refused(Exception):
    """A request the ledger refuses: ``status`` is the HTTP status, ``retry_after`` seconds or None."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class JournalCorrupt(ValueError):
    """A journal record that is damaged and not the last one: the ledger will not start."""


def new_operator_key() -> str:
    return "dro." + secrets.token_hex(24)


def api_key(operator_key: str, name: str) -> str:
    """The API key of client ``name`` (deterministic: an HMAC of the name under the operator key)."""
    if not NAME.match(name):
        raise ValueError(f"key name {name!r}: use 1-64 letters, digits, '_' or '-'")
    mac = hmac.new(operator_key.encode(), name.encode(), hashlib.sha256).hexdigest()[:32]
    return f"drk.{name}.{mac}"


def key_name(operator_key: str, key: str) -> str:
    """The client name in an API key, checked against its MAC; ``Refused(401)`` otherwise."""
    match = KEY.match(key or "")
    if not match:
        raise Refused(401, "missing or malformed API key: send 'Authorization: Bearer drk.<name>.<32 hex>'")
    if not hmac.compare_digest(api_key(operator_key, match.group(1)), key):
        raise Refused(401, "unknown API key")
    return match.group(1)


def images_digest(images: np.ndarray) -> str:
    """What a request asked, as a SHA-256 of its shape and bytes (the idempotency check)."""
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def check_request_id(rid) -> str:
    """``rid`` when it is a request id (a string of 1-128 letters, digits and ``._:/-``);
    ``Refused(400)`` otherwise: never coerced, so every ledger call keys the same string."""
    if not isinstance(rid, str) or not REQUEST_ID.match(rid):
        shown = repr(rid) if len(repr(rid)) <= 40 else repr(rid)[:37] + "..."
        raise Refused(400, f"request id: expected a string of 1-128 letters, digits and ._:/- (the Idempotency-Key "
                           f"header or the body's \"id\"), got {shown}")
    return rid


def check_key_settings(budget, rate_limit=None, burst=1.0, prada_delta=None) -> dict:
    """A key's settings, checked: ``budget`` an int >= 0; ``rate_limit`` images/s and ``burst``
    finite and > 0 (``rate_limit`` None: no limit); ``prada_delta`` in (0, 1] or None."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget: expected a whole number of images >= 0, got {budget!r}")
    for name, value, optional in (("rate_limit", rate_limit, True), ("burst", burst, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    if prada_delta is not None and (isinstance(prada_delta, bool) or not isinstance(prada_delta, (int, float))
                                    or not 0 < prada_delta <= 1):
        raise ValueError(f"prada_delta: expected a number in (0, 1] or null, got {prada_delta!r}")
    return {"budget": int(budget), "rate_limit": None if rate_limit is None else float(rate_limit),
            "burst": float(burst), "prada_delta": None if prada_delta is None else float(prada_delta)}


# --------------------------------------------------------------------------- the journal

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


def key_conflicts(records: list[dict], wanted: dict[str, dict]) -> list[str]:
    """The names in ``wanted`` (name -> key settings) that the journal holds with other settings."""
    held = {r["name"]: {k: r[k] for k in ("budget", "rate_limit", "burst", "prada_delta")}
            for r in records if r["type"] == "key"}
    return [n for n, settings in wanted.items() if n in held and held[n] != check_key_settings(**settings)]


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


# --------------------------------------------------------------------------- the ledger

class _Account:
    """One key: its settings, what it spent, its stored answers, reservations, bucket, detector."""

    def __init__(self, name: str, settings: dict):
        self.name, self.settings = name, settings
        self.used = 0
        self.answers: dict[str, tuple[str, object]] = {}  # rid -> (digest, shown)
        self.pending: dict[str, tuple[int, str, float]] = {}  # rid -> (n, digest, since)
        self.tokens, self.stamp = settings["burst"], time.monotonic()
        self.prada = PradaDetector(settings["prada_delta"]) if settings["prada_delta"] is not None else None

    @property
    def reserved(self) -> int:
        return sum(n for n, _, _ in self.pending.values())

    def rate_wait(self, n: int) -> float:
        """Refill the bucket; seconds until it holds ``n`` tokens (0: a batch of ``n`` may go now)."""
        rate = self.settings["rate_limit"]
        if rate is None:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.settings["burst"], self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return max(0.0, (n - self.tokens) / rate)

    def usage(self) -> dict:
        return {"name": self.name, **self.settings, "used": self.used, "reserved": self.reserved,
                "left": self.settings["budget"] - self.used - self.reserved, "requests": len(self.answers),
                "prada_flagged_at": None if self.prada is None else self.prada.flagged_at}


class Ledger:
    """Keys, budgets, stored answers and PRADA over the journal at ``path`` (see the module doc).

    ``service``: what the journal is for (e.g. ``{"checkpoint_sha256", "output"}``); a journal
    written for another service is refused. Thread-safe.
    """

    def __init__(self, path: str, operator_key: str, service: dict):
        if not OPERATOR_KEY.match(operator_key or ""):
            raise ValueError("operator key: expected 'dro.' and 48 hex digits (ledger.new_operator_key())")
        self.operator_key, self.service = operator_key, dict(service)
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._refusals: collections.deque = collections.deque(maxlen=REFUSALS_KEPT)
        self._journal = Journal(path)
        records = self._journal.records
        try:
            check_service(path, records, self.service)
        except ValueError:
            self._journal.close()
            raise
        if not records:
            self._journal.append({"type": "service", **self.service, "time": time.time()})
        for record in records[1:]:
            self._apply(record)

    def _apply(self, record: dict) -> None:
        if record["type"] == "key":
            self._accounts[record["name"]] = _Account(record["name"], check_key_settings(
                record["budget"], record["rate_limit"], record["burst"], record["prada_delta"]))
        elif record["type"] == "answer":
            account = self._accounts[record["key"]]
            account.used += record["n"]
            account.answers[record["rid"]] = (record["digest"], record["shown"])
            if account.prada is not None and "images" in record:
                images = np.frombuffer(base64.b64decode(record["images"]), np.uint8).reshape(record["shape"])
                account.prada.observe(images, np.asarray(record["labels"]))

    # -- keys
    def authenticate(self, key: str) -> str:
        """The name behind an API key; ``Refused(401)`` for a malformed, forged or unknown key."""
        name = key_name(self.operator_key, key)
        if name not in self._accounts:
            raise Refused(401, "unknown API key")
        return name

    def create_key(self, name: str, **settings) -> str:
        """Create client ``name`` (or return its key when it exists with the same settings)."""
        settings = check_key_settings(**settings)
        key = api_key(self.operator_key, name)
        with self._lock:
            existing = self._accounts.get(name)
            if existing is not None:
                if existing.settings != settings:
                    raise Refused(409, f"key {name!r} exists with other settings ({existing.settings}); "
                                       "choose another name")
                return key
            self._journal.append({"type": "key", "name": name, **settings, "time": time.time()})
            self._accounts[name] = _Account(name, settings)
        return key

    # -- requests
    def begin(self, name: str, rid: str, n: int, digest: str):
        """``("stored", answer)`` for a request id already answered, else ``("go", None)`` with
        the ``n`` images reserved; ``Refused`` 400/402/409/413/429 otherwise (nothing charged)."""
        check_request_id(rid)
        if n < 1:
            raise Refused(400, "empty batch: send at least one image")
        with self._lock:
            account = self._accounts.get(name)
            if account is None:
                raise Refused(401, "unknown API key")
            stored = account.answers.get(rid)
            if stored is not None:
                if stored[0] != digest:
                    raise self._refuse(name, rid, n, 409, f"request id {rid!r} was already used for other images; "
                                                          "use a new id for a new request")
                return "stored", stored[1]
            now = time.monotonic()
            for old, (_, _, since) in list(account.pending.items()):
                if now - since > PENDING_TIMEOUT_S:
                    del account.pending[old]
            if rid in account.pending:  # a retry while the first try is (or was) in flight
                if account.pending[rid][1] != digest:
                    raise self._refuse(name, rid, n, 409, f"request id {rid!r} is in flight with other images")
                account.pending[rid] = (n, digest, now)
                return "go", None
            rate, burst = account.settings["rate_limit"], account.settings["burst"]
            if rate is not None and n > burst:  # it could never pass the bucket: not worth a retry
                raise self._refuse(name, rid, n, 413, f"batch of {n} images is larger than this key's burst of "
                                                      f"{burst:g} (rate limit {rate:g} images/s): send at most "
                                                      f"{math.floor(burst)} images per request")
            budget, left = account.settings["budget"], account.settings["budget"] - account.used - account.reserved
            if n > left:
                raise self._refuse(name, rid, n, 402, f"query refused: {n} image(s) requested but only {max(left, 0)} "
                                                      f"of the budget of {budget} left; nothing was answered or charged")
            wait = account.rate_wait(n)
            if wait > 0:
                raise self._refuse(name, rid, n, 429, f"rate limit of {rate:g} images/s: "
                                                      f"retry in {wait:.2f} s", retry_after=wait)
            account.tokens -= n
            account.pending[rid] = (n, digest, now)
            return "go", None

    def commit(self, name: str, rid: str, digest: str, labels, shown, images: np.ndarray):
        """Journal and charge one answered request; returns what the client is shown (the stored
        answer if the request id was committed already, never charged twice)."""
        check_request_id(rid)
        with self._lock:
            account = self._accounts[name]
            stored = account.answers.get(rid)
            if stored is not None:
                account.pending.pop(rid, None)
                return stored[1]
            n = len(labels)
            if rid not in account.pending and account.used + account.reserved + n > account.settings["budget"]:
                # its reservation was lost (the ledger restarted mid-request) and the budget has
                # gone to others since: refused like any request over budget, nothing charged
                raise self._refuse(name, rid, n, 402, f"query refused: {n} image(s) requested but the budget of "
                                                      f"{account.settings['budget']} is spent; nothing was charged")
            record = {"type": "answer", "key": name, "rid": rid, "n": n, "digest": digest, "time": time.time(),
                      "labels": [int(x) for x in labels], "shown": shown}
            if account.prada is not None:  # PRADA is rebuilt from the journal: it needs the images
                record.update(images=base64.b64encode(np.ascontiguousarray(images).tobytes()).decode(),
                              shape=list(images.shape))
            self._journal.append(record)
            account.pending.pop(rid, None)
            account.used += n
            account.answers[rid] = (digest, shown)
            if account.prada is not None:
                account.prada.observe(images, np.asarray(labels))
            return shown

    def release(self, name: str, rid: str) -> None:
        """Drop the reservation of a request whose answer could not be computed (nothing charged)."""
        check_request_id(rid)
        with self._lock:
            self._accounts[name].pending.pop(rid, None)

    def _refuse(self, name, rid, n, status, message, retry_after=None) -> Refused:
        self._refusals.append({"time": time.time(), "key": name, "rid": rid, "n": n, "status": status,
                               "reason": message})
        return Refused(status, message, retry_after)

    # -- the operator's view
    def usage(self, name: str | None = None) -> dict | list[dict]:
        with self._lock:
            if name is not None:
                if name not in self._accounts:
                    raise Refused(404, f"no key named {name!r}")
                return self._accounts[name].usage()
            return [a.usage() for a in self._accounts.values()]

    def prada_state(self, name: str) -> dict:
        with self._lock:
            account = self._accounts.get(name)
            if account is None:
                raise Refused(404, f"no key named {name!r}")
            return {} if account.prada is None else account.prada.state()

    def audit(self, name: str | None = None) -> dict:
        """Paid requests from the journal (without images or answers) and recent refusals."""
        with self._lock:
            paid = [{k: r[k] for k in ("time", "key", "rid", "n", "digest")}
                    for r in read_journal(self._journal.path) if r["type"] == "answer"
                    and (name is None or r["key"] == name)]
            refused = [r for r in self._refusals if name is None or r["key"] == name]
        return {"paid": paid, "refused": refused}

    def close(self) -> None:
        self._journal.close()


def _describe(record: dict) -> str:
    shown = [f"{k}={v}" for k, v in record.items() if k not in ("type", "time", "seq", "prev", "journal")]
    return ", ".join(shown) or "no service record"
