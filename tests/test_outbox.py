"""The durable outbox on real SQLite files: order, bounds, restart, survival of a SIGKILL; and how the sender cuts a round into publishes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import jsonschema
import pytest
from conftest import REPO

from agent.errors import TransportError
from agent.messages import (
    Batch,
    MetricsMessage,
    SequenceCounter,
    batch_payload,
    unbatch,
)
from agent.schemas import schema_documents
from agent.transport.outbox import Outbox, Spooled, stored_size
from agent.transport.spooled import MAX_PAYLOAD_BYTES, RateLimiter, publishes, refusal

TOPIC = "edge/dev-1/inference"


def open_outbox(path, max_bytes=1 << 20, max_age_s=3600.0, synchronous="normal"):
    return Outbox(path, max_bytes=max_bytes, max_age_s=max_age_s, synchronous=synchronous)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_oldest_first_and_deleted_only_when_removed(tmp_path, synchronous):
    outbox = open_outbox(tmp_path / "o.db", synchronous=synchronous)
    for i in range(10):
        outbox.put(TOPIC, 1, b"%d" % i)
    first = outbox.after(0, 4)
    assert [m.payload for m in first] == [b"0", b"1", b"2", b"3"]
    assert [m.payload for m in outbox.after(first[-1].id, 100)] == [b"%d" % i for i in range(4, 10)]
    outbox.remove([first[0].id, first[2].id])
    assert outbox.stats().depth == 8
    outbox.sync()
    outbox.close()

    reopened = open_outbox(tmp_path / "o.db")
    assert [m.payload for m in reopened.after(0, 100)] == [b"1", b"3"] + [b"%d" % i for i in range(4, 10)]
    assert reopened.stats().depth == 8
    assert reopened.stats().bytes == sum(stored_size(TOPIC, b"0") for _ in range(8))


def test_ids_never_reused_after_the_outbox_empties(tmp_path):
    """The sender's cursor only moves forward, so a new message must never get an id it has passed."""
    outbox = open_outbox(tmp_path / "o.db")
    outbox.put(TOPIC, 1, b"a")
    [only] = outbox.after(0, 10)
    outbox.remove([only.id])
    outbox.put(TOPIC, 1, b"b")
    assert [m.payload for m in outbox.after(only.id, 10)] == [b"b"]


def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path):
    payload = b"x" * 200
    bound = 50 * stored_size(TOPIC, payload)
    outbox = open_outbox(tmp_path / "o.db", max_bytes=bound)
    for i in range(500):
        outbox.put(TOPIC, 1, payload[:-4] + b"%04d" % i)
    stats = outbox.stats()
    assert stats.bytes <= bound
    assert stats.depth + stats.evicted_full == 500
    assert stats.evicted_full >= 450
    kept = outbox.after(0, 1000)
    assert kept[-1].payload.endswith(b"0499")  # the newest are kept
    assert [int(m.payload[-4:]) for m in kept] == list(range(500 - len(kept), 500))


def test_messages_past_max_age_are_dropped_and_counted(tmp_path):
    outbox = open_outbox(tmp_path / "o.db", max_age_s=60)
    for _ in range(3):
        outbox.put(TOPIC, 1, b"old")
    assert outbox.expire() == 0
    assert outbox.expire(now=time.time() + 61) == 3
    stats = outbox.stats()
    assert (stats.depth, stats.evicted_old, stats.bytes) == (0, 3, 0)


def test_unwritable_path_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TransportError, match="outbox.path"):
        open_outbox(blocker / "o.db")


def test_an_outbox_is_used_by_one_process_at_a_time(tmp_path):
    """A second agent on the same outbox would send the same messages again: it is refused, naming the first;
    the lock goes with the process however it ends (here SIGKILL)."""
    path = tmp_path / "o.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from agent.transport.outbox import Outbox; Outbox({str(path)!r}, max_bytes=1 << 20, max_age_s=60); print('open', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(TransportError) as refused:
            open_outbox(path)
        assert str(refused.value).startswith(f"outbox.path {path}: another edge-agent (pid {holder.pid}) is using this outbox")
    finally:
        holder.kill()
        holder.wait(10)
    open_outbox(path).close()
    again = open_outbox(path)  # closed, it is free for the next one
    with pytest.raises(TransportError, match="another edge-agent"):
        open_outbox(path)  # and one open in this process is enough to refuse another
    again.close()


def test_accepted_messages_survive_sigkill(tmp_path):
    """A child process puts messages and says which were accepted; after SIGKILL every one of them is there."""
    path = tmp_path / "o.db"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from agent.transport.outbox import Outbox
            outbox = Outbox({str(path)!r}, max_bytes=1 << 30, max_age_s=3600)
            i = 0
            while True:
                outbox.put("{TOPIC}", 1, b"%d" % i)
                print(i, flush=True)
                i += 1
        """)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    accepted = []
    for line in child.stdout:
        accepted.append(int(line))
        if len(accepted) == 2000:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    stored = {int(m.payload) for m in open_outbox(path).after(0, 1_000_000)}
    assert set(accepted) <= stored


def test_refusal_before_the_network():
    assert refusal(TOPIC, b"x" * MAX_PAYLOAD_BYTES, "inference") is None
    assert "payload limit" in refusal(TOPIC, b"x" * (MAX_PAYLOAD_BYTES + 1), "inference")
    assert "at most 7" in refusal("a/b/c/d/e/f/g/h/i", b"{}", "inference")
    assert "wildcard" in refusal("edge/+/inference", b"{}", "inference")


def test_rate_limiter_holds_to_the_quotas():
    by_count = RateLimiter(publishes_per_s=100, bytes_per_s=1e9)
    assert all(by_count.wait_s(10) == 0 for _ in range(100))
    assert by_count.wait_s(10) > 0
    by_bytes = RateLimiter(publishes_per_s=1e6, bytes_per_s=512 * 1024)
    assert by_bytes.wait_s(512 * 1024) == 0
    assert by_bytes.wait_s(1024) > 0


def spooled(ids, topic=TOPIC, size=100) -> list[Spooled]:
    return [Spooled(i, topic, 1, b"x" * size) for i in ids]


def test_a_round_is_sent_as_runs_of_one_topic_up_to_batch_max():
    due = spooled(range(1, 6)) + spooled([6], topic="edge/dev-1/metrics") + spooled(range(7, 10))
    assert [[m.id for m in group] for group in publishes(due, batch_max=3)] == [[1, 2, 3], [4, 5], [6], [7, 8, 9]]
    assert [len(group) for group in publishes(due, batch_max=1)] == [1] * 9


def test_a_batch_stays_within_iot_cores_payload_limit():
    size = 30 * 1024
    groups = publishes(spooled(range(1, 11), size=size), batch_max=10)
    assert [len(group) for group in groups] == [4, 4, 2]
    assert all(len(batch_payload([m.payload for m in group])) <= MAX_PAYLOAD_BYTES for group in groups)
    assert [len(g) for g in publishes(spooled([1, 2], size=MAX_PAYLOAD_BYTES - 10), batch_max=10)] == [1, 1]


def test_a_batch_payload_is_the_batch_message_of_its_messages():
    """The sender joins encoded messages without decoding them: the result is what pydantic would write."""
    sequence = SequenceCounter("dev-1")
    metrics = [
        MetricsMessage(**sequence.envelope(), interval_s=1, frames_read=n, frames_dropped=0, frames_corrupt=0, results=n, fps=30, latency_p50_ms=1, latency_p99_ms=2)
        for n in range(3)
    ]
    payload = batch_payload([m.to_json_bytes() for m in metrics])
    assert payload == Batch(messages=metrics).to_json_bytes()
    jsonschema.validate(json.loads(payload), schema_documents()["batch.schema.json"])
    assert unbatch(payload) == [json.loads(m.to_json_bytes()) for m in metrics]
    assert unbatch(metrics[0].to_json_bytes()) == [json.loads(metrics[0].to_json_bytes())]
