"""`walrep load` and the trio client against a scripted leader: a real ROUTER socket
on loopback that answers as a test says, to reach orders of events a real leader
only produces under rare timing (a refusal that overtakes a retry, one slow reply
among fast ones)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
import trio
import zmq

from cluster import wire
from cluster.client import AppendUnknown, open_client
from cluster.procs import walrep_command

pytestmark = pytest.mark.timeout(120)


class ScriptedLeader:
    """A ROUTER on 127.0.0.1 run by a thread. answer(request, copy, now) returns
    (delay_s, reply) or None (no reply to this copy); copy counts the copies of one
    request id, from 1. arrivals holds (time, request_id, copy)."""

    def __init__(self, answer: Callable[[wire.Append, int, float], tuple | None]):
        self.answer = answer
        self.arrivals: list[tuple[float, int, int]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScriptedLeader:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()
        self._ctx.term()

    def _run(self) -> None:
        copies: dict[int, int] = {}
        pending: list[tuple[float, bytes, bytes]] = []  # (due, peer, reply)
        while not self._stop.is_set():
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                self._sock.send_multipart([item[1], item[2]])
            if not self._sock.poll(5, zmq.POLLIN):
                continue
            peer, data = self._sock.recv_multipart()
            request = wire.decode(data)
            copies[request.request_id] = copy = copies.get(request.request_id, 0) + 1
            self.arrivals.append((time.monotonic(), request.request_id, copy))
            scripted = self.answer(request, copy, time.monotonic())
            if scripted is not None:
                delay, reply = scripted
                pending.append((time.monotonic() + delay, peer, wire.encode(reply)))


def refuse_the_first_copy_once_the_second_arrives(request, copy, now):
    # The first copy waits (a busy leader); when the retry arrives, the first copy's
    # refusal goes out, and the retry itself stays queued: it could still be appended.
    if copy == 2:
        return 0.0, wire.Refused("busy", "queue full", request_id=request.request_id)
    return None


def run_load(endpoint: str, tmp_path, *extra: str) -> tuple[int, list[dict]]:
    log = tmp_path / "h.jsonl"
    result = subprocess.run(
        walrep_command("load", "--ingest", endpoint, "--size", "20", "--log", str(log), *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, [json.loads(line) for line in log.read_text().splitlines()]


def test_load_logs_a_refusal_after_a_retry_as_unknown(tmp_path):
    with ScriptedLeader(refuse_the_first_copy_once_the_second_arrives) as leader:
        code, records = run_load(
            leader.endpoint, tmp_path, "--count", "3", "--batch", "3", "--timeout", "0.5",
            "--retries", "3",
        )  # fmt: skip
    assert code == 1
    assert [(r["outcome"], r["attempts"]) for r in records] == [("unknown", 2)] * 3


def test_load_logs_a_refusal_of_the_only_attempt_as_failed(tmp_path):
    def refuse(request, copy, now):
        return 0.0, wire.Refused("busy", "queue full", request_id=request.request_id)

    with ScriptedLeader(refuse) as leader:
        code, records = run_load(leader.endpoint, tmp_path, "--count", "2", "--batch", "2")
    assert code == 1
    assert [(r["outcome"], r["attempts"]) for r in records] == [("failed", 1)] * 2


def test_client_raises_unknown_for_a_refusal_after_a_retry():
    async def main(endpoint):
        async with open_client(endpoint, timeout=0.5) as client:
            with pytest.raises(AppendUnknown) as caught:
                await client.append_batch([b"x"], retries=3)
            assert caught.value.attempts == 2
            assert "refused (busy: queue full) after 2 attempts" in str(caught.value)

    with ScriptedLeader(refuse_the_first_copy_once_the_second_arrives) as leader:
        trio.run(main, leader.endpoint)


def test_load_sends_into_a_slot_as_soon_as_a_reply_frees_it(tmp_path):
    """Two in flight, three requests: request 2's answer takes 1 s. Request 1's answer
    frees a slot at once, and request 3 must go out then, not when request 2 ends."""

    def answer(request, copy, now):
        delay = 1.0 if request.request_id == 2 else 0.0
        first = request.request_id * 100
        return delay, wire.Appended(request.request_id, first, first)

    with ScriptedLeader(answer) as leader:
        code, records = run_load(
            leader.endpoint, tmp_path, "--count", "3", "--batch", "1", "--inflight", "2"
        )
        arrivals = {request_id: t for t, request_id, _copy in leader.arrivals}
    assert code == 0 and [r["outcome"] for r in records].count("ok") == 3
    assert arrivals[3] - arrivals[1] < 0.5, "request 3 waited for request 2's slow answer"
