"""The disk-backed outbox: order, priorities, bounded size, crash safety, full disk, receipts (real SQLite)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from core.errors import QueueError
from edge_agent.outbox import Outbox, OutboxMessage, SendWindow

T = "edgeloop/v1/devices/d1/x"  # 24 bytes of topic in every message's size


def drain(box: Outbox) -> list[bytes]:
    out = []
    while batch := box.peek_batch(7):
        out += [m.payload for m in batch]
        box.ack(m.id for m in batch)
    return out


def test_delivery_order_is_priority_then_fifo(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        for i, prio in enumerate([2, 1, 0, 2, 1, 0, 1]):
            box.put(T, f"{prio}-{i}".encode(), prio)
        assert drain(box) == [b"0-2", b"0-5", b"1-1", b"1-4", b"1-6", b"2-0", b"2-3"]
        assert box.stats().depth == 0 and box.stats().bytes == 0


def test_peek_skips_in_flight_ids_and_ack_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        ids = [x for x in (box.put(T, bytes([i]), 1) for i in range(5)) if x is not None]
        first = box.peek_batch(2)
        assert [m.id for m in first] == ids[:2]
        assert [m.id for m in box.peek_batch(10, exclude=[m.id for m in first])] == ids[2:]
        assert box.ack([ids[0], ids[0], 12345]) == 1
        assert box.ack([ids[0]]) == 0
        assert len(box) == 4


def test_retain_and_qos_are_kept(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        box.put(T, b"s", 0, qos=1, retain=True)
        box.put(T, b"t", 1, qos=0)
        m1, m2 = box.peek_batch(2)
        assert (m1.retain, m1.qos, m2.retain, m2.qos) == (True, 1, False, 0)


def test_full_queue_drops_oldest_samples_first_and_counts_them(tmp_path: Path) -> None:
    size = 100 + len(T)
    with Outbox(tmp_path / "o.sqlite", max_bytes=10 * size) as box:
        for i in range(6):
            box.put(T, b"s%02d" % i + b"." * 97, 2)
        for i in range(3):
            box.put(T, b"r%02d" % i + b"." * 97, 1)
        box.put(T, b"c00" + b"." * 97, 0)  # now exactly full
        box.put(T, b"c01" + b"." * 97, 0)  # evicts the oldest sample
        box.put(T, b"r03" + b"." * 97, 1)  # evicts the next oldest sample
        st = box.stats()
        assert (st.depth, st.bytes, st.dropped_samples, st.dropped_messages) == (10, 10 * size, 2, 0)
        assert [p[:3] for p in (m.payload for m in box.peek_batch(100))] == [
            b"c00", b"c01", b"r00", b"r01", b"r02", b"r03", b"s02", b"s03", b"s04", b"s05"]


def test_samples_never_push_out_reports_or_state(tmp_path: Path) -> None:
    size = 100 + len(T)
    with Outbox(tmp_path / "o.sqlite", max_bytes=4 * size) as box:
        for _ in range(2):
            box.put(T, b"r" * 100, 1)
            box.put(T, b"c" * 100, 0)
        assert box.put(T, b"s" * 100, 2) is None  # the new sample itself is dropped
        assert box.stats().dropped_samples == 1 and box.stats().depth == 4


def test_state_evicts_reports_but_never_state(tmp_path: Path) -> None:
    size = 100 + len(T)
    with Outbox(tmp_path / "o.sqlite", max_bytes=3 * size) as box:
        box.put(T, b"c" * 100, 0)
        box.put(T, b"r" * 100, 1)
        box.put(T, b"c" * 100, 0)
        box.put(T, b"c" * 100, 0)  # the report goes
        assert box.stats().dropped_messages == 1 and box.stats().depth_by_priority == {0: 3}
        with pytest.raises(QueueError, match="full of state/job messages"):
            box.put(T, b"c" * 100, 0)
        assert box.stats().depth == 3  # nothing lost


def test_a_message_bigger_than_the_cap_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", max_bytes=1000) as box:
        box.put(T, b"x", 0)
        with pytest.raises(QueueError, match="larger than the outbox cap") as err:
            box.put(T, b"x" * 1000, 0)
        assert err.value.hint and err.value.path == tmp_path / "o.sqlite"
        assert box.stats().depth == 1


def test_queue_and_drop_counter_survive_reopening(tmp_path: Path) -> None:
    size = 10 + len(T)
    with Outbox(tmp_path / "o.sqlite", max_bytes=3 * size) as box:
        for i in range(5):
            box.put(T, b"%010d" % i, 2)
        box.ack([box.peek_batch(1)[0].id])
    with Outbox(tmp_path / "o.sqlite", max_bytes=3 * size) as box:
        st = box.stats()
        assert (st.depth, st.bytes, st.dropped_samples) == (2, 2 * size, 2)
        assert drain(box) == [b"%010d" % 3, b"%010d" % 4]


_WRITER = textwrap.dedent("""
    import sys, threading
    from edge_agent.outbox import Outbox
    box = Outbox(sys.argv[1], synchronous=sys.argv[2])
    for i in range(200):
        box.put("t/x", b"%d" % i, i % 3)
    box.ack([m.id for m in box.peek_batch(50)])
    print("written", flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_kill_9_loses_nothing_acknowledged_as_written(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "o.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), synchronous], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path) as box:
        left = drain(box)
    expected = sorted(range(200), key=lambda i: (i % 3, i))[50:]
    assert left == [b"%d" % i for i in expected]


def test_full_disk_is_a_one_line_queue_error_and_keeps_stored_messages(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    # max_file_bytes makes SQLite itself report "database or disk is full" (SQLITE_FULL).
    with Outbox(path, max_file_bytes=64 * 1024) as box:
        stored = 0
        with pytest.raises(QueueError) as err:
            for _ in range(1000):
                box.put(T, os.urandom(4000), 1)
                stored += 1
        assert 0 < stored < 1000
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and "free space" in msg
        assert box.stats().depth == stored
        box.ack([m.id for m in box.peek_batch(5)])  # still usable: acking frees room
        assert box.put(T, b"after", 0) is not None


def test_concurrent_producers_and_a_consumer(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        def produce(k: int) -> None:
            for i in range(100):
                box.put(T, b"%d-%03d" % (k, i), 1)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        got: list[bytes] = []
        while len(got) < 300:
            if not box.wait(5.0) and not box.peek_batch(1):
                break
            batch = box.peek_batch(50)
            got += [m.payload for m in batch]
            box.ack(m.id for m in batch)
        for t in threads:
            t.join()
        got += drain(box)
        assert len(got) == 300
        for k in range(3):  # FIFO per producer
            mine = [g for g in got if g.startswith(b"%d-" % k)]
            assert mine == sorted(mine)


def test_corrupt_file_is_a_queue_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="corrupt|not a database"):
        Outbox(path)


def test_send_window_reads_ahead_and_batches_deletes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        for i in range(10):
            box.put(T, b"s%d" % i, 2)
        w = SendWindow(box, max_inflight=4)
        sent: list[OutboxMessage] = []
        while (m := w.next()) is not None:
            w.sent(len(sent), m)
            sent.append(m)
        assert [m.payload for m in sent] == [b"s0", b"s1", b"s2", b"s3"]  # the window is full
        assert w.delivered(0) == sent[0].id and box.stats().depth == 10  # delete is batched...
        w.delivered(1)
        assert box.stats().depth == 8  # ...at half a window
        box.put(T, b"urgent", 0)  # a put makes the window re-read: priority wins over read-ahead
        m = w.next()
        assert m is not None and m.payload == b"urgent"
        w.sent(99, m)
        assert w.delivered(12345) is None  # unknown token (e.g. a message sent outside the outbox)
        for token in (2, 3, 99):
            w.delivered(token)
        assert w.idle and box.stats().depth == 6  # an empty window flushes at once
        w.unsend(nxt := w.next())  # type: ignore[arg-type]
        assert w.next() == nxt
        w.reset()
        assert [w.next(), w.next()] == box.peek_batch(2)  # re-read from the outbox after a reset


# --------------------------------------------------------------------------- receipts (schema v2)

_V1_SCHEMA = """
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, topic TEXT NOT NULL,
                     payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, size INTEGER NOT NULL,
                     created REAL NOT NULL);
CREATE INDEX outbox_order ON outbox (priority, id);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('bytes', 0), ('dropped_samples', 3), ('dropped_messages', 1);
PRAGMA user_version = 1;
"""


def test_a_v1_outbox_is_migrated_in_place_keeping_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    for i, prio in enumerate([1, 0, 2]):
        payload = b"v1-%d" % i
        db.execute("INSERT INTO outbox (priority, topic, payload, qos, retain, size, created) VALUES (?,?,?,1,0,?,?)",
                   (prio, T, payload, len(payload) + len(T), 1000.0 + i))
    db.execute("UPDATE counters SET value = ? WHERE name = 'bytes'", (3 * (4 + len(T)),))
    db.commit()
    db.close()
    with Outbox(path) as box:
        st = box.stats()
        assert (st.depth, st.bytes, st.dropped_samples, st.dropped_messages) == (3, 3 * (4 + len(T)), 3, 1)
        assert (st.awaiting_receipt, st.resent, box.receipts_seen, box.watermark) == (0, 0, False, None)
        assert [m.payload for m in box.peek_batch(10)] == [b"v1-1", b"v1-0", b"v1-2"]
        first = box.peek_batch(1)[0]
        assert box.mark_sent([first.id], 2000.0) == 1  # the new columns work
        assert box.put(T, b"v2", 1) is not None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT sent, resends FROM outbox ORDER BY priority, id LIMIT 1").fetchone() == (2000.0, 0)
    with Outbox(path) as box:  # opening a v2 file again changes nothing
        assert box.stats().depth == 4 and box.stats().awaiting_receipt == 1


def test_an_outbox_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 3")
    with pytest.raises(QueueError, match="schema version 3"):
        Outbox(path)


def test_sent_messages_wait_for_a_receipt_out_of_the_senders_sight(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        ids = [box.put(T, b"m%d" % i, 1) for i in range(4)]
        assert box.mark_sent(ids[:3], 100.0) == 3
        assert [m.payload for m in box.peek_batch(10)] == [b"m3"]
        st = box.stats()
        assert (st.depth, st.awaiting_receipt, st.bytes) == (4, 3, 4 * (2 + len(T)))  # held rows still count
        assert box.receipt([ids[0], ids[1], 99999]) == 2  # unknown ids are ignored
        assert box.receipt([ids[0]]) == 0  # receipts may repeat
        st = box.stats()
        assert (st.depth, st.awaiting_receipt, st.bytes) == (2, 1, 2 * (2 + len(T)))
        assert box.receipts_seen and box.watermark == 100.0
        box.mark_sent([ids[3]], 50.0)
        box.receipt([ids[3]])
        assert box.watermark == 100.0  # the newest sent time receipted so far
    with Outbox(tmp_path / "o.sqlite") as box:  # both survive a restart
        assert box.receipts_seen and box.watermark == 100.0


def test_an_empty_receipt_marks_receipts_seen(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        assert not box.receipts_seen
        assert box.receipt([]) == 0
        assert box.receipts_seen and box.watermark is None


def test_requeue_after_the_watermark_passes_by_the_grace(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        a, b, c = (box.put(T, x, 1) for x in (b"a", b"b", b"c"))
        box.mark_sent([a], 100.0)
        box.mark_sent([b], 105.0)
        box.mark_sent([c], 111.0)
        box.receipt([c])  # the fleet committed c, PUBACKed 11 s after a and 6 s after b
        assert box.watermark == 111.0
        kw = {"watermark": box.watermark, "grace_s": 10.0, "timeout_s": 1000.0}
        assert box.requeue_overdue(112.0, **kw) == 1  # only a: b may still be on its way
        assert [m.payload for m in box.peek_batch(10)] == [b"a"]
        assert box.requeue_overdue(112.0, **kw) == 0
        st = box.stats()
        assert (st.awaiting_receipt, st.resent) == (1, 1)
        # a watermark ahead of the clock (the clock went back) is ignored
        assert box.requeue_overdue(105.5, watermark=10_000.0, grace_s=0.0, timeout_s=1000.0) == 0


def test_requeue_after_the_timeout_backs_off_per_resend(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        mid = box.put(T, b"x", 1)
        kw = {"watermark": None, "grace_s": 0.0, "timeout_s": 10.0}
        for wait in (10, 20, 40, 80, 160, 160):  # 10 s * 2**resends, at most 16x
            box.mark_sent([mid], 1000.0)
            assert box.requeue_overdue(1000.0 + wait - 0.5, **kw) == 0
            assert box.requeue_overdue(1000.0 + wait + 0.5, **kw) == 1
            assert [m.id for m in box.peek_batch(1)] == [mid]
        assert box.stats().resent == 6


def test_requeue_when_the_clock_went_back(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        mid = box.put(T, b"x", 1)
        box.mark_sent([mid], 5000.0)
        assert box.requeue_overdue(4000.0, watermark=None, grace_s=10.0, timeout_s=60.0) == 1


def test_requeue_bumps_puts_so_a_send_window_reads_again(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        first, second = box.put(T, b"first", 1), box.put(T, b"second", 1)
        w = SendWindow(box, max_inflight=4)
        m = w.next()
        assert m is not None and m.id == first
        w.sent(1, m, receipt=True)
        w.delivered(1)  # window empty: flushed, first is now held
        assert box.stats().awaiting_receipt == 1
        assert box.requeue_overdue(time.time() + 3600, watermark=None, grace_s=0.0, timeout_s=60.0) == 1
        assert [w.next().id, w.next().id] == [first, second]  # type: ignore[union-attr]  # in order again


def test_send_window_holds_receipt_messages_and_deletes_the_rest(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        for i in range(4):
            box.put(T, b"m%d" % i, 1)
        w = SendWindow(box, max_inflight=8)
        sent = [w.next() for _ in range(4)]
        for token, m in enumerate(sent):
            assert m is not None
            w.sent(token, m, receipt=token % 2 == 0)
        w.delivered(0)
        w.delivered(1)
        w.delivered(2, failed=True)  # refused by the broker: no receipt will come, delete it
        assert box.stats().depth == 4 and not w.idle  # written back in one batch...
        w.delivered(3)
        st = box.stats()  # ...when the window empties
        assert w.idle and (st.depth, st.awaiting_receipt) == (1, 1)
        assert box.receipt([sent[0].id]) == 1  # type: ignore[union-attr]
        assert len(box) == 0


def test_send_window_does_not_hand_out_a_delivered_message_before_it_is_written_back(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        for i in range(6):
            box.put(T, b"m%d" % i, 1)
        w = SendWindow(box, max_inflight=8)
        m = w.next()
        assert m is not None
        w.sent(0, m, receipt=True)
        w.sent(1, w.next())  # type: ignore[arg-type]
        w.delivered(0)  # held, not yet flushed (one still in flight)
        box.put(T, b"new", 0)  # forces a re-read
        seen = [w.next() for _ in range(5)]
        assert m.id not in {x.id for x in seen if x is not None}


def test_full_queue_evicts_messages_awaiting_a_receipt_first(tmp_path: Path) -> None:
    size = 100 + len(T)
    with Outbox(tmp_path / "o.sqlite", max_bytes=4 * size) as box:
        ids = [box.put(T, b"r%02d" % i + b"." * 97, 1) for i in range(4)]
        box.mark_sent([ids[2]], 100.0)  # PUBACKed, awaiting the fleet
        box.put(T, b"r04" + b"." * 97, 1)
        assert [m.payload[:3] for m in box.peek_batch(10)] == [b"r00", b"r01", b"r03", b"r04"]
        st = box.stats()
        assert (st.awaiting_receipt, st.dropped_messages) == (0, 1)


def test_forget_receipts_releases_every_held_message(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        ids = [box.put(T, b"m%d" % i, 1) for i in range(3)]
        box.receipt([])
        assert box.oldest_held() is None
        box.mark_sent(ids[:2], 200.0)
        box.mark_sent(ids[:1], 100.0)
        assert box.oldest_held() == 100.0
        assert box.forget_receipts() == 2
        assert not box.receipts_seen and box.oldest_held() is None
        assert [m.id for m in box.peek_batch(10)] == ids and box.stats().resent == 2
    with Outbox(tmp_path / "o.sqlite") as box:
        assert not box.receipts_seen
