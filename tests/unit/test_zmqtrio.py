"""cluster.zmqtrio on real zmq sockets over 127.0.0.1 loopback.

Every port is chosen by the OS (bind to ``tcp://127.0.0.1:*``) and every
test is bounded with ``trio.fail_after``, because a broken adapter shows
up as a hang, not an exception.

The stress test and its negative twin are the proof asked for in
ZMQ_TRIO.md: the first moves 100 k messages each way through sockets
shared by several tasks; the second turns off the re-check of EVENTS after
each call (the adapter's test seam) and shows that the same scenario then
hangs, so the first test is able to fail.
"""

from __future__ import annotations

import copy
import pickle
import random
import socket
import struct
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import zmq

from walrep.cluster.zmqtrio import TrioSocket, WouldBlock, make_socket

LOOPBACK = "tcp://127.0.0.1:*"
# Generous for single messages on loopback; a hang is what this catches.
IO_TIMEOUT_S = 10.0
# How long a cancelled receive waits before its scope fires.
SHORT_WAIT_S = 0.05


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    # Sockets a failed test left open must not keep term() waiting.
    context.destroy(linger=0)


async def pair(
    ctx: zmq.Context, bind_type: int, connect_type: int, **kwargs
) -> tuple[TrioSocket, TrioSocket]:
    bound = make_socket(ctx, bind_type, **kwargs)
    connected = make_socket(ctx, connect_type, **kwargs)
    connected.connect(bound.bind(LOOPBACK))
    await trio.lowlevel.checkpoint()
    return bound, connected


async def wait_until_subscribed(pub: TrioSocket, sub: TrioSocket) -> None:
    """Return once messages published now reach ``sub``.

    A subscription travels to the publisher asynchronously and a PUB drops
    whatever it sends before that. Probe until one arrives, then send a
    marker and discard everything up to it: probes still in flight cannot
    be mistaken for data afterwards. With several prefixes, subscribe
    ``probe`` last: its arrival then shows that the others took effect.
    """
    while True:
        await pub.send(b"probe")
        with trio.move_on_after(SHORT_WAIT_S):
            await sub.recv()
            break
    await pub.send(b"marker")
    while await sub.recv() != b"marker":
        pass


# -- basic delivery per socket pattern --------------------------------------


async def test_pub_sub_delivers_in_order(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pub, sub = await pair(ctx, zmq.PUB, zmq.SUB)
        sub.subscribe(b"")
        await wait_until_subscribed(pub, sub)
        for i in range(100):
            await pub.send(b"m%d" % i)
        assert [await sub.recv() for _ in range(100)] == [b"m%d" % i for i in range(100)]
        await pub.aclose()
        await sub.aclose()


async def test_sub_receives_only_its_prefix(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pub, sub = await pair(ctx, zmq.PUB, zmq.SUB)
        # The publisher applies subscriptions in the order they were sent, so a probe
        # that arrives proves the ones before it too: "probe" goes last. Subscribed
        # first, a probe could arrive while "marker" was still on its way, and the
        # marker was dropped (a hang seen once, on a slow run of the suite).
        sub.subscribe(b"marker")
        sub.subscribe(b"wanted")
        sub.subscribe(b"probe")
        await wait_until_subscribed(pub, sub)
        await pub.send(b"other-1")
        await pub.send(b"wanted-1")
        assert await sub.recv() == b"wanted-1"


async def test_dealer_router_round_trip_by_identity(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        router, dealer = await pair(ctx, zmq.ROUTER, zmq.DEALER)
        await dealer.send_multipart([b"hello", b"world"])
        identity, *body = await router.recv_multipart()
        assert body == [b"hello", b"world"]
        await router.send_multipart([identity, b"reply"])
        assert await dealer.recv() == b"reply"


async def test_push_pull(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        for i in range(1000):
            await push.send(struct.pack("<I", i))
        got = [struct.unpack("<I", await pull.recv())[0] for _ in range(1000)]
        assert got == list(range(1000))


async def test_bind_returns_the_port_the_os_chose(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        star = make_socket(ctx, zmq.PULL)
        zero = make_socket(ctx, zmq.PULL)
        for sock, spec in ((star, "tcp://127.0.0.1:*"), (zero, "tcp://127.0.0.1:0")):
            endpoint = sock.bind(spec)
            host, port = endpoint.rsplit(":", 1)
            assert host == "tcp://127.0.0.1"
            assert int(port) > 0
            push = make_socket(ctx, zmq.PUSH)
            push.connect(endpoint)
            await push.send(b"found you")
            assert await sock.recv() == b"found you"


async def test_options_are_in_force_on_the_bound_socket(ctx):
    sock = make_socket(ctx, zmq.PUB, hwm=123, options={zmq.RCVHWM: 7, zmq.XPUB_NODROP: 1})
    sock.bind(LOOPBACK)
    raw = sock.zmq_socket
    assert (raw.getsockopt(zmq.SNDHWM), raw.getsockopt(zmq.RCVHWM)) == (123, 7)
    assert raw.getsockopt(zmq.LINGER) == 0
    await sock.aclose()


# -- the non-blocking twins ----------------------------------------------------


async def test_nowait_calls_raise_would_block_in_both_vocabularies(ctx):
    lonely = make_socket(ctx, zmq.DEALER)  # bound, no peer: cannot send or receive
    lonely.bind(LOOPBACK)
    for call in (lonely.recv_nowait, lonely.recv_multipart_nowait):
        with pytest.raises(trio.WouldBlock):
            call()
    with pytest.raises(zmq.Again) as raised:
        lonely.send_nowait(b"x")
    # What a caller that speaks pyzmq reads off a zmq.Again.
    assert raised.value.errno == zmq.EAGAIN
    assert str(raised.value) == zmq.Again().strerror
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(copy.copy(raised.value))
    with pytest.raises(WouldBlock):
        lonely.send_multipart_nowait([b"x", b"y"])


async def test_recv_of_a_multipart_message_raises_and_keeps_framing(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        await push.send_multipart([b"a", b"b", b"c"])
        await push.send(b"next")
        with pytest.raises(ValueError, match="3 frames"):
            await pull.recv()
        assert await pull.recv() == b"next"


async def test_a_multipart_send_with_a_bad_part_sends_nothing(ctx):
    # Sends skip pyzmq's per-part checks for bytes; any other part must still be
    # checked before the first frame leaves, or the socket would hold half a
    # message that the next send completes.
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        with pytest.raises(TypeError):
            await push.send_multipart([b"head", object(), b"tail"])
        with pytest.raises(TypeError):
            push.send_multipart_nowait([b"head", 7])
        await push.send_multipart([b"a", bytearray(b"b"), memoryview(b"c")])
        await push.send_multipart([b"d", b"e"])
        assert await pull.recv_multipart() == [b"a", b"b", b"c"]
        assert await pull.recv_multipart() == [b"d", b"e"]


# -- cancellation never loses or invents a message -------------------------------


async def test_recv_cancelled_by_timeout_then_later_recv_gets_the_message(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        with trio.move_on_after(SHORT_WAIT_S) as scope:
            await pull.recv()
        assert scope.cancelled_caught
        await push.send(b"after the timeout")
        assert await pull.recv() == b"after the timeout"


async def test_cancelled_recv_does_not_take_a_waiting_message(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        await push.send(b"keep me")
        while not pull.zmq_socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            await trio.sleep(0.001)
        with trio.CancelScope() as scope:
            scope.cancel()
            await pull.recv()
        assert scope.cancelled_caught
        assert await pull.recv() == b"keep me"


async def test_cancelled_send_sends_nothing(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        with trio.CancelScope() as scope:
            scope.cancel()
            await push.send(b"never")
        assert scope.cancelled_caught
        await push.send(b"only this")
        assert await pull.recv() == b"only this"
        with trio.move_on_after(SHORT_WAIT_S):
            extra = await pull.recv()
            pytest.fail(f"a cancelled send was delivered: {extra!r}")


async def test_recv_under_random_cancellation_loses_nothing(ctx):
    count = 5000
    rng = random.Random(1)
    with trio.fail_after(IO_TIMEOUT_S * 3):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)

        async def produce():
            for i in range(count):
                await push.send(struct.pack("<I", i))
                if rng.random() < 0.01:
                    await trio.sleep(rng.random() * 0.001)

        received = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            while len(received) < count:
                with trio.move_on_after(rng.random() * 0.0005):
                    received.append(struct.unpack("<I", await pull.recv())[0])
        assert received == list(range(count))


# -- several tasks on one socket --------------------------------------------------


async def test_one_socket_serves_a_sending_and_two_receiving_tasks(ctx):
    count = 3000
    with trio.fail_after(IO_TIMEOUT_S * 3):
        router, dealer = await pair(ctx, zmq.ROUTER, zmq.DEALER)
        received = []

        async def echo():
            while True:
                await router.send_multipart(await router.recv_multipart())

        async def send_all():
            for i in range(count):
                await dealer.send(struct.pack("<I", i))

        async def receive(done: trio.Event):
            while len(received) < count:
                received.append(struct.unpack("<I", await dealer.recv())[0])
            done.set()

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(receive, done)
            nursery.start_soon(receive, done)
            nursery.start_soon(send_all)
            await done.wait()
            nursery.cancel_scope.cancel()
        # Two receivers may append out of order; none may lose or repeat.
        assert sorted(received) == list(range(count))


async def wait_for_waiters(sock: TrioSocket, count: int) -> None:
    while (s := sock.statistics()).tasks_waiting_recv + s.tasks_waiting_send != count:
        await trio.sleep(0.001)


async def test_cancelling_the_task_on_the_fd_hands_the_wait_to_another(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        pull, push = await pair(ctx, zmq.PULL, zmq.PUSH)
        first_scope = trio.CancelScope()
        got = []

        async def first():
            with first_scope:
                got.append(await pull.recv())

        async def second():
            got.append(await pull.recv())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await wait_for_waiters(pull, 1)  # first sleeps on the FD
            nursery.start_soon(second)
            await wait_for_waiters(pull, 2)  # second is parked behind it
            first_scope.cancel()
            await wait_for_waiters(pull, 1)
            await push.send(b"for the second")
        assert got == [b"for the second"]


async def test_a_waiting_sender_and_receiver_on_one_socket_both_wake(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        lonely = make_socket(ctx, zmq.DEALER)  # bound, no peer: both directions wait
        endpoint = lonely.bind(LOOPBACK)
        got = []

        async def receive():
            got.append(await lonely.recv())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(lonely.send, b"to the peer")
            await wait_for_waiters(lonely, 2)
            peer = make_socket(ctx, zmq.DEALER)
            peer.connect(endpoint)
            assert await peer.recv() == b"to the peer"
            await peer.send(b"back to you")
        assert got == [b"back to you"]


@pytest.mark.parametrize("recheck_after_call", [True, False], ids=["recheck", "no-recheck"])
async def test_a_call_that_swallows_an_edge_still_wakes_the_waiting_sender(ctx, recheck_after_call):
    """Pitfall 2, made deterministic: one receiver sleeps on the FD, a
    sender is parked behind it on a full pipe, and a third caller's
    recv_nowait swallows the edge that says "room to send" before trio can
    poll. Only the re-check after that call can wake the sender."""
    big = b"." * (1 << 20)
    with trio.fail_after(IO_TIMEOUT_S):
        a, b = await pair(ctx, zmq.DEALER, zmq.DEALER, hwm=1)
        a._recheck_after_call = recheck_after_call
        sent = refusals = 0
        while refusals < 5:  # fill a's pipe and both kernel buffers
            try:
                a.send_nowait(big)
                sent, refusals = sent + 1, 0
            except WouldBlock:
                refusals += 1
                await trio.sleep(0.02)
        sender_done = trio.Event()

        async def send_when_room():
            await a.send(b"unblocked")
            sender_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.recv)
            await wait_for_waiters(a, 1)  # the receiver sleeps on the FD
            nursery.start_soon(send_when_room)
            await wait_for_waiters(a, 2)  # the sender is parked
            # Blocking the trio loop on purpose: libzmq's I/O threads empty
            # the path and tell socket a "room to send" while trio cannot
            # poll, so the next call on a is sure to swallow that edge.
            for _ in range(sent):
                while True:
                    try:
                        b.recv_nowait()
                        break
                    except WouldBlock:
                        time.sleep(0.005)
            time.sleep(0.1)
            with pytest.raises(WouldBlock):
                a.recv_nowait()  # swallows the edge
            with trio.move_on_after(1.0):
                await sender_done.wait()
            nursery.cancel_scope.cancel()
        assert sender_done.is_set() == recheck_after_call


async def test_close_wakes_every_waiting_task_with_closed_resource_error(ctx):
    with trio.fail_after(IO_TIMEOUT_S):
        lonely = make_socket(ctx, zmq.DEALER)  # bound, no peer: everything waits
        lonely.bind(LOOPBACK)
        outcomes: list[str] = []

        async def expect_closed(call):
            try:
                await call()
            except trio.ClosedResourceError:
                outcomes.append("closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_closed, lonely.recv)
            nursery.start_soon(expect_closed, lonely.recv_multipart)
            nursery.start_soon(expect_closed, lambda: lonely.send(b"x"))
            await wait_for_waiters(lonely, 3)
            lonely.close()
        assert outcomes == ["closed"] * 3
        assert lonely.closed
        with pytest.raises(trio.ClosedResourceError):
            await lonely.recv()
        with pytest.raises(trio.ClosedResourceError):
            lonely.send_nowait(b"x")
        lonely.close()  # idempotent


# -- "ready to send" that lies ---------------------------------------------------


async def test_xpub_nodrop_blocks_the_sender_instead_of_raising_or_dropping(ctx):
    # Big messages and small HWMs fill the path (HWMs plus kernel buffers)
    # quickly; the reader is slow on purpose.
    count, size = 600, 64 * 1024
    with trio.fail_after(IO_TIMEOUT_S * 3):
        xpub = make_socket(ctx, zmq.XPUB, hwm=4, options={zmq.XPUB_NODROP: 1})
        sub = make_socket(ctx, zmq.SUB, hwm=4)
        sub.connect(xpub.bind(LOOPBACK))
        sub.subscribe(b"")
        assert await xpub.recv() == b"\x01"  # the subscription has arrived
        received = []

        async def read_slowly():
            while len(received) < count:
                received.append(struct.unpack_from("<I", await sub.recv())[0])
                if len(received) % 50 == 0:
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            for i in range(count):
                await xpub.send(struct.pack("<I", i).ljust(size, b"."))
        assert received == list(range(count))
        assert xpub.statistics().lied_send_retries > 0


# -- the stress test and the proof that it can fail -------------------------------

STRESS_MESSAGES = 100_000  # each way: PUB->SUB, and DEALER->ROUTER->DEALER
# Ample for the stress run (about 12 s on a 2-core machine).
STRESS_DEADLINE_S = 50.0
# No message anywhere for this long means a hang: the healthy run never
# pauses longer than a nap (MAX_NAP_S) plus scheduling noise.
STALL_S = 2.0
WATCH_INTERVAL_S = 0.1
# DEALER messages in flight. Keeps every pipe below its HWM (1000), so a
# ROUTER_MANDATORY send never fails; large, so the DEALER's sending task
# keeps calling into the socket while replies arrive, which is when a
# swallowed edge strands the receiving task.
DEALER_WINDOW = 500
# PUB->SUB: NODROP turns overflow into back-pressure, so every message
# arrives and counting is deterministic.
PUB_HWM = 10_000
NAP_PROBABILITY = 0.001
MAX_NAP_S = 0.002
# Runs of the negative scenario: a hang is expected within a few seconds.
NEGATIVE_DEADLINE_S = 20.0


@dataclass
class StressProgress:
    pub_sent: int = 0
    sub_received: int = 0
    dealer_sent: int = 0
    dealer_received: int = 0
    elapsed_s: float = 0.0
    stalled_for_s: float = 0.0
    # Read when a stall is detected: a message waiting on the DEALER while
    # its receiving task sleeps on the FD is the signature of a lost edge.
    dealer_message_ready_at_stall: bool = False
    dealer_tasks_waiting_recv_at_stall: int = 0

    def moved(self) -> int:
        return self.pub_sent + self.sub_received + self.dealer_sent + self.dealer_received


async def run_stress(
    ctx: zmq.Context,
    progress: StressProgress,
    *,
    count: int,
    recheck_after_call: bool,
    on_stall: Callable[[], None],
    seed: int,
) -> None:
    """One trio loop: PUB->SUB stream plus a DEALER driven by separate send
    and receive tasks against a ROUTER echo, all napping at random."""
    rng = random.Random(seed)

    async def maybe_nap():
        if rng.random() < NAP_PROBABILITY:
            await trio.sleep(rng.random() * MAX_NAP_S)

    async with AsyncExitStack() as stack:
        pub = make_socket(ctx, zmq.PUB, hwm=PUB_HWM, options={zmq.XPUB_NODROP: 1})
        sub = make_socket(ctx, zmq.SUB, hwm=PUB_HWM)
        router = make_socket(ctx, zmq.ROUTER, options={zmq.ROUTER_MANDATORY: 1})
        dealer = make_socket(ctx, zmq.DEALER)
        for sock in (pub, sub, router, dealer):
            await stack.enter_async_context(sock)
            sock._recheck_after_call = recheck_after_call
        sub.connect(pub.bind(LOOPBACK))
        sub.subscribe(b"")
        dealer.connect(router.bind(LOOPBACK))
        await wait_until_subscribed(pub, sub)
        window = trio.Semaphore(DEALER_WINDOW)
        started = time.monotonic()

        async def publish():
            for i in range(count):
                await pub.send(struct.pack("<Q", i))
                progress.pub_sent += 1
                await maybe_nap()

        async def subscribe():
            for i in range(count):
                assert struct.unpack("<Q", await sub.recv())[0] == i
                progress.sub_received += 1
                await maybe_nap()

        async def echo():
            while True:
                await router.send_multipart(await router.recv_multipart())
                await maybe_nap()

        async def dealer_send():
            for i in range(count):
                await window.acquire()
                await dealer.send(struct.pack("<Q", i))
                progress.dealer_sent += 1
                await maybe_nap()

        async def dealer_receive():
            for i in range(count):
                assert struct.unpack("<Q", await dealer.recv())[0] == i
                progress.dealer_received += 1
                window.release()
                await maybe_nap()

        async def watchdog():
            last_moved, last_change = -1, time.monotonic()
            while True:
                await trio.sleep(WATCH_INTERVAL_S)
                now = time.monotonic()
                if progress.moved() != last_moved:
                    last_moved, last_change = progress.moved(), now
                elif now - last_change >= STALL_S:
                    progress.stalled_for_s = now - last_change
                    raw_events = dealer.zmq_socket.getsockopt(zmq.EVENTS)
                    progress.dealer_message_ready_at_stall = bool(raw_events & zmq.POLLIN)
                    stats = dealer.statistics()
                    progress.dealer_tasks_waiting_recv_at_stall = stats.tasks_waiting_recv
                    on_stall()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            nursery.start_soon(echo)
            async with trio.open_nursery() as streams:
                for task in (publish, subscribe, dealer_send, dealer_receive):
                    streams.start_soon(task)
            progress.elapsed_s = time.monotonic() - started
            nursery.cancel_scope.cancel()


async def test_stress_100k_each_way_on_shared_sockets_all_arrive(ctx):
    progress = StressProgress()
    seed = random.randrange(2**32)

    def stalled():
        raise AssertionError(f"stress run stalled (seed {seed}): {progress}")

    with trio.fail_after(STRESS_DEADLINE_S):
        await run_stress(
            ctx,
            progress,
            count=STRESS_MESSAGES,
            recheck_after_call=True,
            on_stall=stalled,
            seed=seed,
        )
    assert progress.sub_received == progress.dealer_received == STRESS_MESSAGES


async def test_stress_hangs_without_the_recheck_after_each_call(ctx):
    """The stress test can fail: without the re-check, a DEALER send
    swallows the edge announcing a reply, and the receiving task sleeps
    on the FD forever while the reply waits in the socket."""
    progress = StressProgress()
    seed = random.randrange(2**32)
    with trio.move_on_after(NEGATIVE_DEADLINE_S) as scope:
        await run_stress(
            ctx,
            progress,
            count=STRESS_MESSAGES,
            recheck_after_call=False,
            on_stall=lambda: scope.cancel(),
            seed=seed,
        )
    context = f"seed {seed}: {progress}"
    assert scope.cancelled_caught, f"completed without the re-check ({context})"
    assert progress.stalled_for_s >= STALL_S, f"slow, not hung ({context})"
    assert progress.dealer_received < STRESS_MESSAGES, context
    assert progress.dealer_tasks_waiting_recv_at_stall == 1, context
    assert progress.dealer_message_ready_at_stall, context


# -- what the FD wake-up relies on in trio ----------------------------------------


async def test_an_fd_woken_by_notify_closing_can_be_waited_on_again():
    """TrioSocket wakes its FD sleeper with trio.lowlevel.notify_closing and then waits
    on the same FD again. trio documents notify_closing for closing only: if a trio
    upgrade stops re-registering the FD afterwards, this fails instead of a hang."""
    left, right = socket.socketpair()
    with left, right, trio.fail_after(IO_TIMEOUT_S):
        woken = trio.Event()

        async def sleeper():
            with pytest.raises(trio.ClosedResourceError):
                await trio.lowlevel.wait_readable(left.fileno())
            woken.set()
            await trio.lowlevel.wait_readable(left.fileno())  # readiness still arrives

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.notify_closing(left.fileno())
            await woken.wait()
            await trio.testing.wait_all_tasks_blocked()
            right.send(b"x")
