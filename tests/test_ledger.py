"""The target's ledger without Ray or HTTP: exact budgets, idempotent string request ids, the
journal's crash rules (a torn last line past the high-water mark is cut at any byte; truncation,
emptying, a flipped bit, a missing record or a damaged mark refuse to start), PRADA rebuilt."""

import os
import threading

import numpy as np
import pytest

from drmi_ray.ledger import Ledger, Refused, api_key, check_key_settings, images_digest, key_name, new_operator_key
from drmi_ray.service_journal import JournalCorrupt, read_journal

SERVICE = {"checkpoint_sha256": "ab" * 32, "output": "label", "decimals": None}


@pytest.fixture
def operator():
    return new_operator_key()


def ask(ledger, name, rid, images, labels=None):
    """One request as the gateway makes it: begin, then commit the model's answer."""
    digest = images_digest(images)
    status, stored = ledger.begin(name, rid, len(images), digest)
    if status == "stored":
        return stored
    labels = list(range(len(images))) if labels is None else labels
    return ledger.commit(name, rid, digest, labels, labels, images)


def test_budget_is_exact_and_a_batch_over_it_is_refused_whole(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=10)
    assert ask(ledger, "a", "r0", digits[0][:4]) == [0, 1, 2, 3]
    with pytest.raises(Refused) as e:
        ask(ledger, "a", "r1", digits[0][:7])  # 4 + 7 > 10: refused whole
    assert e.value.status == 402 and "only 6 of the budget of 10 left" in e.value.message
    ask(ledger, "a", "r1", digits[0][:6])
    assert ledger.usage("a")["used"] == 10
    with pytest.raises(Refused, match="only 0"):
        ask(ledger, "a", "r2", digits[0][:1])
    assert [r["n"] for r in read_journal(str(tmp_path / "j.jsonl")) if r["type"] == "answer"] == [4, 6]


def test_zero_budget_refuses_everything(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("z", budget=0)
    with pytest.raises(Refused, match="budget of 0"):
        ask(ledger, "z", "r0", digits[0][:1])
    assert ledger.usage("z")["used"] == 0


def test_a_retried_request_id_returns_the_stored_answer_and_charges_once(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=5)
    first = ask(ledger, "a", "r0", digits[0][:5], labels=[7, 7, 1, 2, 3])
    again = ask(ledger, "a", "r0", digits[0][:5], labels=[0, 0, 0, 0, 0])  # labels unused: stored
    assert first == again == [7, 7, 1, 2, 3] and ledger.usage("a")["used"] == 5
    with pytest.raises(Refused) as e:  # the same id for other images
        ask(ledger, "a", "r0", digits[0][1:6])
    assert e.value.status == 409
    # a commit that arrives twice (the gateway retried after a lost reply) is charged once
    digest = images_digest(digits[0][:5])
    assert ledger.commit("a", "r0", digest, [1] * 5, [1] * 5, digits[0][:5]) == [7, 7, 1, 2, 3]
    assert ledger.usage("a")["used"] == 5


def test_a_released_reservation_charges_nothing(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=5)
    assert ledger.begin("a", "r0", 5, images_digest(digits[0][:5]))[0] == "go"
    assert ledger.usage("a")["reserved"] == 5
    with pytest.raises(Refused, match="only 0"):  # reserved counts against the budget
        ledger.begin("a", "r1", 1, images_digest(digits[0][:1]))
    ledger.release("a", "r0")  # the model replica died: nothing charged
    assert ledger.usage("a")["used"] == 0 and ledger.usage("a")["reserved"] == 0
    assert ask(ledger, "a", "r0", digits[0][:5]) == [0, 1, 2, 3, 4]


def test_a_commit_whose_reservation_was_lost_in_a_restart_cannot_pass_the_budget(tmp_path, operator, digits):
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    ledger.create_key("a", budget=10)
    a, b = digits[0][:10], digits[0][10:20]
    assert ledger.begin("a", "A", 10, images_digest(a))[0] == "go"
    ledger.close()  # the ledger dies with A reserved and not committed
    ledger = Ledger(path, operator, SERVICE)
    ask(ledger, "a", "B", b)  # the restarted ledger lets B have the budget
    with pytest.raises(Refused) as e:  # A's late commit (Serve retried it) is checked again
        ledger.commit("a", "A", images_digest(a), [0] * 10, [0] * 10, a)
    assert e.value.status == 402 and ledger.usage("a")["used"] == 10


def test_concurrent_callers_never_pass_the_budget(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=157)
    answered = []

    def caller(k):
        for i in range(40):
            try:
                answered.append(len(ask(ledger, "a", f"c{k}-{i}", digits[0][: 1 + (k + i) % 5])))
            except Refused as e:
                assert e.status == 402

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal = [r["n"] for r in read_journal(str(tmp_path / "j.jsonl")) if r["type"] == "answer"]
    assert sum(answered) == ledger.usage("a")["used"] == sum(journal) == 157


def test_rate_limit_refuses_with_the_wait_for_the_tokens_and_a_batch_over_the_burst_whole(tmp_path, operator, digits):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=1000, rate_limit=100.0, burst=50.0)
    ask(ledger, "a", "r0", digits[0][:50])  # the whole burst
    with pytest.raises(Refused) as e:
        ask(ledger, "a", "r1", digits[0][:50])  # 50 more tokens take 0.5 s to come
    assert e.value.status == 429 and 0.3 < e.value.retry_after <= 0.5
    with pytest.raises(Refused) as e:  # larger than the burst: it could never pass, refused before any work
        ask(ledger, "a", "r2", digits[0][:51])
    assert e.value.status == 413 and "burst of 50" in e.value.message and e.value.retry_after is None
    assert ledger.usage("a")["used"] == 50 and ledger.usage("a")["reserved"] == 0


@pytest.mark.parametrize("rid", [5, 0, True, False, 1.5, None, ["r"], {"r": 1}, "", "a b", "x" * 129])
def test_a_request_id_that_is_not_a_string_is_refused_in_every_call_never_coerced(tmp_path, operator, digits, rid):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    ledger.create_key("a", budget=10)
    images = digits[0][:2]
    for call in (lambda: ledger.begin("a", rid, 2, images_digest(images)),
                 lambda: ledger.commit("a", rid, images_digest(images), [1, 2], [1, 2], images),
                 lambda: ledger.release("a", rid)):
        with pytest.raises(Refused) as e:
            call()
        assert e.value.status == 400 and "request id" in e.value.message and "\n" not in e.value.message
    usage = ledger.usage("a")
    assert (usage["used"], usage["reserved"], usage["left"]) == (0, 0, 10)


def test_issue_23_repro_begin_with_a_string_then_commit_with_a_number_is_refused(tmp_path, operator, digits):
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    ledger.create_key("a", budget=10)
    a = digits[0][:3]
    assert ledger.begin("a", "5", 3, images_digest(a))[0] == "go"
    with pytest.raises(Refused) as e:  # was: journaled under the int 5, a second slot beside "5"
        ledger.commit("a", 5, images_digest(a), [0] * 3, [0] * 3, a)
    assert e.value.status == 400
    assert ledger.commit("a", "5", images_digest(a), [0] * 3, [0] * 3, a) == [0] * 3
    ledger.close()
    ledger = Ledger(path, operator, SERVICE)  # after a restart, id "5" with other images is still 409
    with pytest.raises(Refused) as e:
        ask(ledger, "a", "5", digits[0][3:6])
    assert e.value.status == 409 and ledger.usage("a")["used"] == 3


@pytest.mark.parametrize("settings, match", [
    (dict(budget=True), "budget"), (dict(budget=-1), "budget"), (dict(budget=2.5), "budget"),
    (dict(budget=5, rate_limit=0), "rate_limit"), (dict(budget=5, rate_limit=float("inf")), "rate_limit"),
    (dict(budget=5, rate_limit=10, burst=float("inf")), "burst"), (dict(budget=5, burst=0), "burst"),
    (dict(budget=5, prada_delta=1.5), "prada_delta"),
])
def test_bad_key_settings_are_refused_before_anything_is_written(tmp_path, operator, settings, match):
    with pytest.raises(ValueError, match=match):
        check_key_settings(**settings)
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    with pytest.raises(ValueError, match=match):
        ledger.create_key("a", **settings)
    assert [r["type"] for r in read_journal(str(tmp_path / "j.jsonl"))] == ["service"]


def test_keys_are_macs_of_their_names(tmp_path, operator):
    ledger = Ledger(str(tmp_path / "j.jsonl"), operator, SERVICE)
    key = ledger.create_key("cell-1", budget=3)
    assert key == api_key(operator, "cell-1") and key_name(operator, key) == "cell-1"
    assert ledger.create_key("cell-1", budget=3) == key  # same name and settings: same key
    with pytest.raises(Refused) as e:
        ledger.create_key("cell-1", budget=4)
    assert e.value.status == 409
    forged = key[:-1] + ("0" if key[-1] != "0" else "1")
    for bad in ("", "drk.cell-1", forged, api_key(new_operator_key(), "cell-1")):
        with pytest.raises(Refused) as e:
            ledger.authenticate(bad)
        assert e.value.status == 401
    with pytest.raises(Refused, match="unknown"):
        ledger.authenticate(api_key(operator, "nobody"))


def paid_journal(tmp_path, operator, digits, requests=(3, 4)):
    """A closed journal with key "a" and one answer per entry of ``requests`` (that many images)."""
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    ledger.create_key("a", budget=100)
    for i, n in enumerate(requests):
        ask(ledger, "a", f"r{i}", digits[0][:n])
    ledger.close()
    return path


def test_a_torn_last_line_at_every_byte_is_cut_and_loses_only_the_unanswered_request(tmp_path, operator, digits):
    """A crash mid-append leaves part of a line with no newline, past the high-water mark: cut off,
    and the client's retry is answered and charged once."""
    path = paid_journal(tmp_path, operator, digits, requests=(3,))
    sealed, mark = open(path, "rb").read(), open(path + ".mark", "rb").read()
    ledger = Ledger(path, operator, SERVICE)
    ask(ledger, "a", "r1", digits[0][:4])
    ledger.close()
    full = open(path, "rb").read()
    last = full[len(sealed):]
    for cut in range(1, len(last)):
        open(path, "wb").write(sealed + last[:cut])
        open(path + ".mark", "wb").write(mark)
        ledger = Ledger(path, operator, SERVICE)
        assert ledger.usage("a")["used"] == 3, cut
        assert open(path, "rb").read() == sealed, cut  # the torn tail is cut off
        ask(ledger, "a", "r1", digits[0][:4])  # the client's retry: charged once
        assert ledger.usage("a")["used"] == 7
        ledger.close()
        assert sum(r["n"] for r in read_journal(path) if r["type"] == "answer") == 7


def test_a_crash_between_a_records_fsync_and_its_mark_keeps_the_record(tmp_path, operator, digits):
    path = paid_journal(tmp_path, operator, digits, requests=(3,))
    old_mark = open(path + ".mark", "rb").read()
    ledger = Ledger(path, operator, SERVICE)
    ask(ledger, "a", "r1", digits[0][:4])
    ledger.close()
    open(path + ".mark", "wb").write(old_mark)  # the mark one record behind
    ledger = Ledger(path, operator, SERVICE)
    assert ledger.usage("a")["used"] == 7 and open(path + ".mark", "rb").read() != old_mark  # sealed again
    ledger.close()


def refused_line(path, operator, match):
    with pytest.raises(JournalCorrupt, match=match) as e:
        Ledger(path, operator, SERVICE)
    assert len(str(e.value).splitlines()) == 1 and path in str(e.value)
    with pytest.raises(JournalCorrupt):
        read_journal(path)


def test_a_journal_truncated_at_any_line_boundary_is_refused(tmp_path, operator, digits):
    path = paid_journal(tmp_path, operator, digits)
    data = open(path, "rb").read()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")][:-1]
    assert len(ends) == 3  # service, key, r0 (r1 is the last line)
    for end in [0, *ends]:
        open(path, "wb").write(data[:end])
        refused_line(path, operator, "high-water mark sealed record 3")
    os.remove(path)
    refused_line(path, operator, "high-water mark sealed record 3")


def test_a_journal_truncated_inside_a_sealed_record_is_refused(tmp_path, operator, digits):
    path = paid_journal(tmp_path, operator, digits)
    data = open(path, "rb").read()
    for cut in range(1, len(data), 7):
        open(path, "wb").write(data[:cut])
        refused_line(path, operator, "high-water mark sealed")


def test_every_bit_flip_in_the_last_complete_record_is_refused(tmp_path, operator, digits):
    path = paid_journal(tmp_path, operator, digits)
    data = open(path, "rb").read()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    for byte in range(start, len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            open(path, "wb").write(bytes(flipped))
            with pytest.raises(JournalCorrupt):
                Ledger(path, operator, SERVICE)
    open(path, "wb").write(data)
    assert Ledger(path, operator, SERVICE).usage("a")["used"] == 7


def test_a_missing_or_damaged_mark_and_moved_records_are_refused(tmp_path, operator, digits):
    path = paid_journal(tmp_path, operator, digits)
    data, mark = open(path, "rb").read(), open(path + ".mark", "rb").read()
    lines = data.split(b"\n")
    open(path, "wb").write(b"\n".join([lines[0], lines[1], lines[3], lines[2], lines[4]]))  # two records swapped
    refused_line(path, operator, "line 3: out of sequence")
    open(path, "wb").write(b"\n".join([lines[0], lines[1], lines[3], lines[4]]))  # one record taken out
    refused_line(path, operator, "line 3: out of sequence")
    open(path, "wb").write(data)
    open(path + ".mark", "wb").write(mark[:-3] + b"\n")
    refused_line(path, operator, "high-water mark .* is damaged")
    os.remove(path + ".mark")
    refused_line(path, operator, "records past its high-water mark")
    open(path + ".mark", "wb").write(mark)
    assert Ledger(path, operator, SERVICE).usage("a")["used"] == 7


def test_a_journal_of_the_old_format_is_refused_in_one_line(tmp_path, operator):
    import json
    import zlib

    path = str(tmp_path / "j.jsonl")
    body = json.dumps({"type": "service", **SERVICE, "time": 0.0}, sort_keys=True, separators=(",", ":"))
    open(path, "wb").write(f"{zlib.crc32(body.encode()):08x} {body}\n".encode())  # format 1: no seq, no mark
    refused_line(path, operator, "is in format 1, this drmi-ray reads format 2 only")


def test_a_damaged_record_before_the_end_refuses_to_start_naming_file_and_line(tmp_path, operator, digits):
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    ledger.create_key("a", budget=100)
    for i in range(3):
        ask(ledger, "a", f"r{i}", digits[0][:2])
    ledger.close()
    lines = open(path, "rb").read().split(b"\n")
    lines[2] = lines[2].replace(b'"n":2', b'"n":0')  # the checksum no longer matches
    open(path, "wb").write(b"\n".join(lines))
    with pytest.raises(JournalCorrupt, match=f"{path} line 3: damaged record"):
        Ledger(path, operator, SERVICE)
    assert open(path, "rb").read() == b"\n".join(lines)  # nothing cut or rewritten


def test_a_journal_is_refused_for_another_target_and_while_another_ledger_holds_it(tmp_path, operator):
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    with pytest.raises(RuntimeError, match="in use by another running service"):
        Ledger(path, operator, SERVICE)
    ledger.close()
    with pytest.raises(ValueError, match="written for another target"):
        Ledger(path, operator, {**SERVICE, "checkpoint_sha256": "cd" * 32})


def test_prada_flags_a_key_at_its_query_count_per_key_and_the_flag_is_rebuilt_from_the_journal(
        tmp_path, operator, digits):
    """A stream PRADA must flag: 130 images one grey level apart, one class, so every distance is
    1/255 up to float32 rounding, as far from normal as it gets (W about 0.15 < delta 0.95) at
    its first test: after 110 queries, the first multiple of 10 with more than 100 distances.
    The key's usage reports that count; another key is untouched."""
    ramp = np.zeros((130, 4, 4), dtype=np.uint8)
    ramp[:, 0, 0] = np.arange(130)
    path = str(tmp_path / "j.jsonl")
    ledger = Ledger(path, operator, SERVICE)
    ledger.create_key("watched", budget=500, prada_delta=0.95)
    ledger.create_key("other", budget=500, prada_delta=0.95)
    for i in range(0, 130, 20):
        ask(ledger, "watched", f"r{i}", ramp[i:i + 20], labels=[0] * len(ramp[i:i + 20]))
    ask(ledger, "other", "r0", digits[0][:5], labels=digits[1][:5].tolist())
    before = ledger.prada_state("watched")
    assert before["queries"] == 130 and before["distances"] == 129 and before["flagged_at"] == 110
    assert ledger.usage("watched")["prada_flagged_at"] == 110
    assert ledger.prada_state("other")["queries"] == 5 and ledger.usage("other")["prada_flagged_at"] is None
    ledger.close()
    again = Ledger(path, operator, SERVICE)
    assert again.prada_state("watched") == before
    assert again.usage("watched")["prada_flagged_at"] == 110
    assert again.usage("other")["prada_flagged_at"] is None
