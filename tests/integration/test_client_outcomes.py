"""`walrep load` and the trio client against a scripted leader: a real ROUTER socket
on loopback that answers as a test says, to reach orders of events a real leader
only produces under rare timing (a refusal that overtakes a retry, one slow reply
among fast ones)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
import trio
import zmq

from walrep.cluster import wire
from walrep.cluster.client import AppendUnknown, ClientError, open_client
from walrep.cluster.procs import walrep_command

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


def never_answer(request, copy, now):
    return None


def answer_after(delays: dict[int, float]):
    """Appended for every request, after delays.get(request_id, 0) seconds; the
    sequences are request_id * 100 on, so a test can tell whose reply it got."""

    def answer(request, copy, now):
        first = request.request_id * 100
        last = first + len(request.payloads) - 1
        return delays.get(request.request_id, 0.0), wire.Appended(request.request_id, first, last)

    return answer


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

    with ScriptedLeader(answer_after({2: 1.0})) as leader:
        code, records = run_load(
            leader.endpoint, tmp_path, "--count", "3", "--batch", "1", "--inflight", "2"
        )
        arrivals = {request_id: t for t, request_id, _copy in leader.arrivals}
    assert code == 0 and [r["outcome"] for r in records].count("ok") == 3
    assert arrivals[3] - arrivals[1] < 0.5, "request 3 waited for request 2's slow answer"


def test_client_gives_up_on_each_attempt_at_its_timeout():
    async def main(endpoint):
        async with open_client(endpoint, timeout=0.3) as client:
            started = trio.current_time()
            with trio.fail_after(5), pytest.raises(AppendUnknown) as caught:
                await client.append_batch([b"x"], retries=2)
            return caught.value.attempts, trio.current_time() - started

    with ScriptedLeader(never_answer) as leader:
        attempts, elapsed = trio.run(main, leader.endpoint)
        copies = [copy for _t, _request_id, copy in leader.arrivals]
    assert attempts == 3 and copies == [1, 2, 3]
    # Three attempts of 0.3 s each; the expiry loop wakes a waiter at its deadline.
    assert 0.9 <= elapsed < 5.0


def test_a_shorter_timeout_is_kept_while_a_longer_one_waits():
    """The expiry loop sleeps until the earliest deadline it knows: a request with a
    shorter timeout, sent while it sleeps, must move that wake-up earlier."""

    async def main(endpoint):
        async with open_client(endpoint, timeout=30) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.append_batch, [b"slow"])  # request 1: waits 30 s
            await trio.sleep(0.1)
            client.timeout = 0.3
            started = trio.current_time()
            with trio.fail_after(5), pytest.raises(AppendUnknown):
                await client.append_batch([b"quick"])  # request 2
            nursery.cancel_scope.cancel()
            return trio.current_time() - started

    with ScriptedLeader(never_answer) as leader:
        elapsed = trio.run(main, leader.endpoint)
    assert 0.3 <= elapsed < 5.0  # not request 1's 30 s


def test_client_matches_replies_that_come_back_in_another_order():
    async def main(endpoint):
        results = {}
        async with open_client(endpoint, timeout=10) as client:

            async def append(name, count):
                results[name] = await client.append_batch([name.encode()] * count)

            async with trio.open_nursery() as nursery:
                for name, count in (("a", 1), ("b", 2), ("c", 3)):
                    nursery.start_soon(append, name, count)
                    await trio.sleep(0.05)  # request ids 1, 2, 3 in this order
        return results

    # Replies in the reverse order of the requests.
    with ScriptedLeader(answer_after({1: 0.6, 2: 0.3, 3: 0.0})) as leader:
        results = trio.run(main, leader.endpoint)
    assert results == {"a": (100, 100), "b": (200, 201), "c": (300, 302)}


def test_a_cancelled_append_leaves_the_client_working():
    """A caller that gives up on a request stops waiting at once; the reply that comes
    later is dropped, and the next request gets its own answer."""

    async def main(endpoint):
        async with open_client(endpoint, timeout=10) as client:
            with trio.move_on_after(0.2) as scope:
                await client.append_batch([b"given-up"])  # request 1: answered after 0.5 s
            assert scope.cancelled_caught
            await trio.sleep(0.6)  # request 1's reply arrives meanwhile
            return await client.append_batch([b"next"])

    with ScriptedLeader(answer_after({1: 0.5})) as leader:
        assert trio.run(main, leader.endpoint) == (200, 200)


def test_a_request_waiting_when_its_client_closes_raises_unknown():
    """A task outside open_client's block outlives the client's loops: closing the
    client must end its wait rather than leave it parked for good."""
    outcome = []

    async def append(client):
        try:
            await client.append_batch([b"x"])
        except AppendUnknown as exc:
            outcome.append(str(exc))

    async def main(leader):
        with trio.fail_after(10):
            async with (
                trio.open_nursery() as outside,
                open_client(leader.endpoint, timeout=30) as client,
            ):
                outside.start_soon(append, client)
                while not leader.arrivals:  # the request is out and waiting
                    await trio.sleep(0.01)
            with pytest.raises(trio.ClosedResourceError):
                await client.append_batch([b"after"])

    with ScriptedLeader(never_answer) as leader:
        trio.run(main, leader)
    assert len(outcome) == 1 and "the client closed while request 1 waited" in outcome[0]


def test_a_request_the_socket_has_no_room_for_gives_up_at_its_timeout():
    """With nobody listening, the DEALER queues up to its high-water mark (1000
    messages) and then has no room: the sends beyond it must end at their deadline."""
    with socket.socket() as probe:  # a loopback port with no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcomes = []

    async def append(client):
        try:
            await client.append_batch([b"x"])
        except AppendUnknown as exc:
            outcomes.append(exc.attempts)

    async def main():
        with trio.fail_after(20):
            async with (
                open_client(f"tcp://127.0.0.1:{port}", timeout=0.5) as client,
                trio.open_nursery() as nursery,
            ):
                for _ in range(1100):
                    nursery.start_soon(append, client)

    trio.run(main)
    assert outcomes == [1] * 1100


def test_retry_refuses_a_second_call_for_the_same_request_and_other_clients_errors():
    async def main(endpoint):
        async with open_client(endpoint, timeout=0.3) as client:
            with pytest.raises(AppendUnknown) as caught:
                await client.append_batch([b"x"])
            unknown = caught.value
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_expect_unknown, client.retry(unknown))
                    await trio.sleep(0.05)  # the first retry waits for its answer
                    with pytest.raises(ClientError, match="already waiting"):
                        await client.retry(unknown)
            async with open_client(endpoint, timeout=0.3) as other:
                with pytest.raises(ValueError, match="same client"):
                    await other.retry(unknown)

    with ScriptedLeader(never_answer) as leader:
        trio.run(main, leader.endpoint)


async def _expect_unknown(call):
    with pytest.raises(AppendUnknown):
        await call


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_timeout_that_is_not_positive_is_refused(timeout):
    async def main():
        with pytest.raises(ValueError, match="positive"):
            async with open_client("tcp://127.0.0.1:9", timeout=timeout):
                pass
        async with open_client("tcp://127.0.0.1:9", timeout=1.0) as client:
            with pytest.raises(ValueError, match="positive"):
                client.timeout = timeout
            assert client.timeout == 1.0

    trio.run(main)


@pytest.mark.parametrize("command", ["append", "load", "status", "verify", "forget-reader"])
def test_every_command_refuses_a_timeout_that_is_not_positive(command, capsys):
    from walrep.cluster.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--timeout", "0"])
    assert exited.value.code == (2 if command == "verify" else 1)  # verify's usage status
    assert "--timeout: 0 is not a positive number of seconds" in capsys.readouterr().err


def test_an_answer_past_its_deadline_does_not_wait():
    """A send that had to wait for room may finish at or after its request's deadline,
    when the expiry loop has already left that request out of its next wake-up: the
    wait must then end at once, not park until some later request's deadline."""
    from walrep.cluster.client import _Answer

    async def main():
        answer = _Answer()
        answer.deadline = trio.current_time()
        with trio.fail_after(2):
            await answer.wait()
        assert answer.message is None

    trio.run(main)
