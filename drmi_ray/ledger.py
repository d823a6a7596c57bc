"""The target's ledger: API keys, spent budget, stored answers and PRADA, over the service's journal.

Plain Python (no Ray, no HTTP); ``drmi_ray.service`` runs one ``Ledger`` as the single Serve
replica every model replica's answer goes through. What it knows is replayed from its journal
(``drmi_ray.service_journal``: one checksummed, chained, fsynced record per key and per paid
answer, and the crash rules) when it starts, and every new key and paid answer is appended there.

A request is charged only when it is in the journal, together with its answer, so a crash can
lose an answer's *computation* but never a paid answer: the client retries with the same
request id and gets the stored answer, charged once.

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
import hashlib
import hmac
import math
import re
import secrets
import threading
import time

import numpy as np

from .prada import PradaDetector
from .service_journal import Journal, check_service, read_journal

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEY = re.compile(r"^drk\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{32})$")
OPERATOR_KEY = re.compile(r"^dro\.[0-9a-f]{48}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
PENDING_TIMEOUT_S = 300.0  # a reservation nobody commits or releases lapses after this
REFUSALS_KEPT = 10000


class Refused(Exception):
    """A refused request (by the ledger, or by the service for its form): ``status`` is the HTTP
    status, ``retry_after`` seconds or None."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


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


def key_conflicts(records: list[dict], wanted: dict[str, dict]) -> list[str]:
    """The names in ``wanted`` (name -> key settings) that the journal holds with other settings."""
    held = {r["name"]: {k: r[k] for k in ("budget", "rate_limit", "burst", "prada_delta")}
            for r in records if r["type"] == "key"}
    return [n for n, settings in wanted.items() if n in held and held[n] != check_key_settings(**settings)]


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
