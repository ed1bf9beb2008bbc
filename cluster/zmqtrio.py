"""pyzmq sockets for trio: the one module in walrep that imports both.

Owns: waiting for a zmq socket from trio tasks (readiness via the socket's
ZMQ_FD and ZMQ_EVENTS), handing that wait over between several tasks that
share one socket, cancellation-safe send and receive, and creating sockets
with their options set before bind/connect.

Must never: call a blocking zmq function (it would freeze the whole trio
loop), read or close the socket's FD (it belongs to libzmq), let two tasks
wait on that FD at once (trio forbids it), or lose a message because a task
was cancelled. It moves frames only: encoding, retries and protocol belong
to the callers.

"Pitfall N" below refers to the numbered list in ZMQ_TRIO.md, the team's
measured notes on pyzmq under trio.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import trio
import zmq
import zmq.utils.monitor

__all__ = [
    "DEFAULT_LINGER_MS",
    "DRAIN_MAX_MESSAGES",
    "LIED_SEND_FIRST_BACKOFF_S",
    "LIED_SEND_MAX_BACKOFF_S",
    "Sender",
    "SocketStatistics",
    "TrioSocket",
    "WouldBlock",
    "make_socket",
    "new_context",
    "send_in_turn",
]

# Plain ints: these are read on every call of the hot path.
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_EVENTS: Final = int(zmq.EVENTS)
_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE: Final = int(zmq.SNDMORE)
# What the _try_* methods return instead of raising when zmq says Again.
_WOULD_BLOCK: Final = object()

_Buffer = bytes | bytearray | memoryview

# A send refused with Again although EVENTS said POLLOUT (pitfall 5: PUB and
# XPUB always report POLLOUT, so under XPUB_NODROP the only way to learn that
# the subscribers caught up is to try again). The first retry only yields,
# which lets receivers in this same loop drain; later ones give libzmq's I/O
# thread time to move data. The cap bounds the extra latency once room
# appears; the number of retries is not bounded, because blocking the
# publisher until subscribers catch up is what NODROP is for; callers bound
# the whole send with a cancel scope.
LIED_SEND_FIRST_BACKOFF_S: Final = 0.0001
LIED_SEND_MAX_BACKOFF_S: Final = 0.005

# How many already-arrived messages a loop takes with the *_nowait calls
# before it awaits again: enough to skip a scheduler pass per message under
# load, few enough that the other tasks of the loop get their turn.
DRAIN_MAX_MESSAGES: Final = 256

# walrep never relies on linger to deliver the last messages (ZMQ_TRIO.md:
# they were lost over ipc even with LINGER=-1; readers notice gaps by
# sequence number and fetch again), while a nonzero linger makes closing the
# context hang on a dead peer.
DEFAULT_LINGER_MS: Final = 0


class WouldBlock(trio.WouldBlock, zmq.Again):
    """Raised by the ``*_nowait`` methods when the call would have to wait.

    It is both trio's and pyzmq's "would block", so a caller can catch
    whichever its layer already speaks.

    Every drain loop ends with one, so it is built without zmq.Again's
    __init__, which imports inside the call (most of a raise's cost: README,
    Performance). errno and strerror are what zmq.Again would carry.
    """

    errno: Final = zmq.EAGAIN
    strerror: Final = "Resource temporarily unavailable"

    def __init__(self, *args: object) -> None:
        # *args: copy and pickle rebuild an exception from its args.
        Exception.__init__(self, *(args or (self.strerror,)))


@dataclass(frozen=True, slots=True)
class SocketStatistics:
    """A snapshot of one TrioSocket, for tests and debugging."""

    tasks_waiting_recv: int
    tasks_waiting_send: int
    lied_send_retries: int  # sends retried after a POLLOUT that lied
    closed: bool


def _peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address as libzmq saw it ("unknown" when it has none, as inproc)."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError):
        return "unknown"


class Sender:
    """Who sent a message: its address, and on demand its port and CURVE key name.

    The port and key are read from the received message only when asked (a hello,
    not every ack), and must be asked before the next receive on the socket: the
    connection's file descriptor may be reused once it closes.
    """

    __slots__ = ("_frame", "address")

    def __init__(self, frame: zmq.Frame) -> None:
        self._frame = frame
        self.address = _peer_address(frame)

    def __str__(self) -> str:
        return self.address

    def host_port(self) -> str:
        """The connection's "host:port" (the address alone where the port is unknown)."""
        try:
            fd = self._frame.get(zmq.SRCFD)
            with socket.socket(fileno=os.dup(fd)) as conn:
                name = conn.getpeername()
        except (zmq.ZMQError, OSError, ValueError):
            return self.address
        if isinstance(name, tuple) and len(name) >= 2:
            host = f"[{name[0]}]" if ":" in str(name[0]) else name[0]
            return f"{host}:{name[1]}"
        return self.address

    def key_name(self) -> str | None:
        """The user id the ZAP handler gave the connection (the CURVE key's name), or None."""
        try:
            user = self._frame.get("User-Id")
        except (zmq.ZMQError, KeyError):
            return None
        return user or None


class TrioSocket:
    """A zmq socket used from trio tasks, with non-blocking calls only.

    Any number of tasks may send and receive on one TrioSocket at the same
    time, all within one trio run (zmq sockets are not thread-safe). Use it
    as ``async with`` or call :meth:`close`; after closing, every method
    raises :class:`trio.ClosedResourceError`, including in tasks that were
    waiting.

    How waiting works: the socket's FD only says "something may have
    changed" (pitfall 1) and libzmq resets it inside almost any call,
    including reading EVENTS (pitfall 2). So a waiting task reads EVENTS
    before sleeping, at most one task at a time sleeps on the FD (pitfall 4)
    while the others park on a ParkingLot for their direction, and after
    every send or receive EVENTS is read again and whoever it says is ready
    is woken, the FD sleeper included. Without that last step a task that
    waits to receive sleeps forever when a sending task's call swallowed the
    edge that announced its message.

    Every async call is a full trio checkpoint, even when no wait was
    needed, and that yield costs more than the zmq call. A consumer that
    wants throughput takes one message with ``await recv()`` and then
    drains with ``recv_nowait()`` until it raises :class:`WouldBlock`.
    """

    # Test seam ONLY: switches off _recheck_events_after_call, the re-check
    # of EVENTS after every send/receive call (pitfall 2). Tests set it to
    # False on an instance to prove that the stress test hangs without it;
    # production code never touches it. The EVENTS read that a task does
    # before it sleeps still wakes the others: that read is part of waiting,
    # not the extra re-check this switches off.
    _recheck_after_call: bool = True

    def __init__(self, sock: zmq.Socket) -> None:
        if not isinstance(sock, zmq.Socket):
            raise TypeError(f"expected a zmq.Socket, got {type(sock).__name__}")
        # zmq.asyncio and friends override send/recv with their own waiting;
        # layering this adapter on them would wait twice, on two loops.
        if type(sock).recv is not zmq.Socket.recv or type(sock).send is not zmq.Socket.send:
            raise TypeError(f"expected a plain zmq.Socket, got {type(sock).__qualname__}")
        if sock.closed:
            raise trio.ClosedResourceError("the zmq socket is already closed")
        self._sock = sock
        self._fd: int = sock.get(zmq.FD)
        self._closed = False
        # Tasks inside _wait_for, whether on the FD or parked. When it is 0
        # nobody can miss an edge, so the re-check is skipped: any task that
        # starts waiting later reads EVENTS before it sleeps.
        self._n_waiting = 0
        self._n_waiting_recv = 0
        self._n_waiting_send = 0
        # The direction the one task sleeping on the FD waits for (0: nobody
        # sleeps on it), so a re-check that finds it ready can wake that task.
        self._fd_flag = 0
        self._fd_sleeping = False
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._lied_send_retries = 0

    # -- lifecycle ---------------------------------------------------------

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket and wake every waiting task with ClosedResourceError.

        Idempotent. ``linger_ms`` overrides the socket's LINGER for this close.
        """
        if self._closed:
            return
        self._closed = True
        # Pitfall 7: trio must forget the FD before libzmq closes it (and may
        # reuse its number); this also wakes the task sleeping on it.
        if trio.lowlevel.in_trio_run():
            trio.lowlevel.notify_closing(self._fd)
        # Parked tasks would also be woken by the FD sleeper's hand-over;
        # waking them here keeps close correct without relying on that.
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        self._sock.close(linger=linger_ms)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- addressing and options (thin pass-throughs) ---------------------

    def bind(self, endpoint: str) -> str:
        """Bind and return the real endpoint (port filled in for ``:*``/``:0``)."""
        self._check_open()
        self._sock.bind(endpoint)
        return self.last_endpoint

    def connect(self, endpoint: str) -> None:
        self._check_open()
        self._sock.connect(endpoint)

    def subscribe(self, prefix: bytes = b"") -> None:
        """SUB/XSUB: receive messages starting with ``prefix`` (all by default)."""
        self._check_open()
        self._sock.setsockopt(zmq.SUBSCRIBE, prefix)

    @property
    def last_endpoint(self) -> str:
        self._check_open()
        return self._sock.get(zmq.LAST_ENDPOINT).decode()

    @property
    def socket_type(self) -> int:
        return self._sock.socket_type

    @property
    def zmq_socket(self) -> zmq.Socket:
        """The wrapped socket, for reading options only.

        Sending or receiving on it directly would swallow edges that the
        tasks waiting here depend on (pitfall 2).
        """
        return self._sock

    def statistics(self) -> SocketStatistics:
        return SocketStatistics(
            tasks_waiting_recv=self._n_waiting_recv,
            tasks_waiting_send=self._n_waiting_send,
            lied_send_retries=self._lied_send_retries,
            closed=self._closed,
        )

    # -- receiving -------------------------------------------------------
    #
    # The _try_* methods do one non-blocking call and report "would block"
    # as a return value: the async loops hit it on every drained queue, and
    # an exception there costs more than the call itself.

    def recv_nowait(self) -> bytes:
        """Receive one single-frame message now, or raise :class:`WouldBlock`.

        A message of several frames is consumed and raises ValueError: its
        sender broke this socket's framing, and returning only the first
        frame would misalign every later receive.
        """
        return self._receive_now(self._try_recv)

    def recv_multipart_nowait(self) -> list[bytes]:
        """Receive one whole message now, or raise :class:`WouldBlock`."""
        return self._receive_now(self._try_recv_multipart)

    def recv_multipart_with_peer_nowait(self) -> tuple[list[bytes], str]:
        """Like :meth:`recv_multipart_with_peer`, now, or raise :class:`WouldBlock`."""
        return self._receive_now(self._try_recv_multipart_with_peer)

    def _receive_now(self, try_recv: Callable[[], Any]) -> Any:
        """What try_recv takes now, or raise :class:`WouldBlock` (the *_nowait calls)."""
        if self._nothing_to_receive():
            raise WouldBlock()
        received = try_recv()
        if received is _WOULD_BLOCK:
            raise WouldBlock()
        return received

    def _nothing_to_receive(self) -> bool:
        # Drains end on an empty queue every time: asking EVENTS costs a fraction of
        # the zmq.Again a failed receive raises. The read wakes whoever it must.
        self._check_open()
        if not self._recheck_after_call:  # the test seam: an edge swallowed, nobody woken
            return not self._sock.getsockopt(_EVENTS) & _POLLIN
        return not self._read_events() & _POLLIN

    async def recv(self) -> bytes:
        """Receive one single-frame message, waiting for it if needed.

        Cancellation never loses a message: a cancelled call has taken none.
        """
        return await self._recv_with(self._try_recv)

    async def recv_multipart(self) -> list[bytes]:
        """Receive one whole message as a list of frames, waiting if needed."""
        return await self._recv_with(self._try_recv_multipart)

    async def recv_multipart_with_peer(self) -> tuple[list[bytes], str]:
        """Receive one whole message and the address of the peer that sent it.

        For logs and rejection counts: "which peer" should be an address an operator
        recognises, not a routing id. TCP peers give "ip"; others give "unknown".
        """
        return await self._recv_with(self._try_recv_multipart_with_peer)

    # Receives take zmq.Frame objects and ask each frame whether more follow: pyzmq's
    # recv_multipart asks getsockopt(RCVMORE), which converts the option to an enum
    # per frame, which nearly doubled a two-frame ROUTER receive (README, Performance).

    def _try_recv_frames(self) -> Any:
        """One whole message as zmq.Frame objects, or _WOULD_BLOCK."""
        self._check_open()
        sock = self._sock
        try:
            frame = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            self._recheck_events_after_call()
            return _WOULD_BLOCK
        frames = [frame]
        while frame.more:
            # The rest of a multipart message is always already there.
            frame = sock.recv(_NOBLOCK, copy=False)
            frames.append(frame)
        self._recheck_events_after_call()
        return frames

    def _try_recv_multipart_with_peer(self) -> Any:
        frames = self._try_recv_frames()
        if frames is _WOULD_BLOCK:
            return _WOULD_BLOCK
        return [frame.bytes for frame in frames], _peer_address(frames[-1])

    async def recv_multipart_with_sender(self) -> tuple[list[bytes], Sender]:
        """Receive one whole message and a :class:`Sender` describing its connection."""
        return await self._recv_with(self._try_recv_multipart_with_sender)

    def recv_multipart_with_sender_nowait(self) -> tuple[list[bytes], Sender]:
        """Like :meth:`recv_multipart_with_sender`, now, or raise :class:`WouldBlock`."""
        return self._receive_now(self._try_recv_multipart_with_sender)

    def _try_recv_multipart_with_sender(self) -> Any:
        frames = self._try_recv_frames()
        if frames is _WOULD_BLOCK:
            return _WOULD_BLOCK
        return [frame.bytes for frame in frames], Sender(frames[-1])

    def _try_recv(self) -> Any:
        frames = self._try_recv_frames()
        if frames is _WOULD_BLOCK:
            return _WOULD_BLOCK
        if len(frames) > 1:
            raise ValueError(
                f"expected a single-frame message, got {len(frames)} frames (use recv_multipart)"
            )
        return frames[0].bytes

    def _try_recv_multipart(self) -> Any:
        frames = self._try_recv_frames()
        if frames is _WOULD_BLOCK:
            return _WOULD_BLOCK
        return [frame.bytes for frame in frames]

    async def _recv_with(self, try_recv: Callable[[], Any]) -> Any:
        waited = False
        # Loops call this right after a drain that ended on an empty queue, so the
        # first receive would mostly fail: asking EVENTS first costs half of the
        # zmq.Again that failure raises. After a wait, EVENTS has just said POLLIN.
        ready = False
        while True:
            # Pitfall 6: the only cancellation point before the message is
            # taken. After it, nothing may raise Cancelled.
            await trio.lowlevel.checkpoint_if_cancelled()
            events_just_read = not ready and self._recheck_after_call
            if not ready and self._nothing_to_receive():
                result = _WOULD_BLOCK
            else:
                result = try_recv()
                events_just_read = False
            if result is _WOULD_BLOCK:
                # Pitfall 3: only now, with the queue drained, do we sleep. When
                # EVENTS was read just above (and woke whoever it had to), reading it
                # again before the sleep would only repeat that.
                waited = await self._wait_for(_POLLIN, events_just_read) or waited
                ready = True
                continue
            if not waited:
                # A trio async call must let other tasks run even when it
                # did not need to wait; shielded, so the message is kept.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return result

    # -- sending -------------------------------------------------------------

    def send_nowait(self, data: _Buffer) -> None:
        """Queue one single-frame message now, or raise :class:`WouldBlock`."""
        if not self._try_send(self._sock.send, data):
            raise WouldBlock()

    def send_multipart_nowait(self, frames: Sequence[_Buffer]) -> None:
        """Queue one multipart message now (all frames or none), or raise WouldBlock."""
        if not self._try_send(self._send_frames, frames):
            raise WouldBlock()

    async def send(self, data: _Buffer) -> None:
        """Queue one single-frame message, waiting for room if needed.

        A cancelled call has sent nothing. "Sent" means handed to libzmq,
        which may still drop it where the socket type allows (a PUB
        without XPUB_NODROP at its high-water mark, a ROUTER without
        ROUTER_MANDATORY to an unknown peer).
        """
        await self._send_with(self._sock.send, data)

    async def send_multipart(self, frames: Sequence[_Buffer]) -> None:
        """Queue one multipart message, waiting for room if needed."""
        await self._send_with(self._send_frames, frames)

    def _send_frames(self, frames: Sequence[_Buffer], flags: int) -> None:
        """pyzmq's send_multipart, without its per-frame IntFlag OR and buffer checks
        (more than half of a two-frame send: README, Performance).
        Any part that is not bytes goes through send_multipart, which checks every
        part before it sends the first, so a bad part cannot leave half a message."""
        sock = self._sock
        for frame in frames:
            if type(frame) is not bytes:
                sock.send_multipart(frames, flags)
                return
        last = len(frames) - 1
        for i in range(last):
            sock.send(frames[i], flags | _SNDMORE)
        sock.send(frames[last], flags)

    def _try_send(self, zmq_send: Callable[[Any, int], Any], payload: Any) -> bool:
        self._check_open()
        try:
            # libzmq accepts the later frames of a message whenever it
            # accepted the first, so a multipart send cannot stop halfway.
            zmq_send(payload, _NOBLOCK)
        except zmq.Again:
            self._recheck_events_after_call()
            return False
        self._recheck_events_after_call()
        return True

    async def _send_with(self, zmq_send: Callable[[Any, int], Any], payload: Any) -> None:
        waited = False
        backoff_s = 0.0
        while True:
            # Same rule as receiving: a cancelled send has not sent.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._try_send(zmq_send, payload):
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            if self._read_events() & _POLLOUT:
                # Pitfall 5: POLLOUT lied (PUB/XPUB under NODROP, ROUTER with
                # MANDATORY). No edge will say when room appears, so poll
                # with a bounded back-off.
                self._lied_send_retries += 1
                await trio.sleep(backoff_s)
                backoff_s = min(
                    max(backoff_s * 2, LIED_SEND_FIRST_BACKOFF_S), LIED_SEND_MAX_BACKOFF_S
                )
                waited = True
            else:
                waited = await self._wait_for(_POLLOUT) or waited

    # -- waiting ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this zmq socket was closed")

    def _recheck_events_after_call(self) -> None:
        """Re-check EVENTS after a send/receive call (pitfall 2).

        The call may have consumed the FD edge that a waiting task (for the
        other direction, or the same one) is sleeping on; EVENTS tells who
        is ready now, and they are woken. Disabled only by the test seam.
        """
        if self._n_waiting and self._recheck_after_call:
            self._read_events()

    def _read_events(self) -> int:
        """Read EVENTS and wake every waiting task whose direction is ready.

        Reading EVENTS itself consumes the edge, so every read must be
        followed by these wake-ups; that is why the two are one method.
        """
        events = self._sock.getsockopt(_EVENTS)
        if self._n_waiting:
            # The waiter is mostly the reader of EVENTS itself, with nobody parked,
            # and unpark_all on an empty lot costs about as much as this read.
            if events & _POLLIN and self._recv_lot:
                self._recv_lot.unpark_all()
            if events & _POLLOUT and self._send_lot:
                self._send_lot.unpark_all()
            if events & self._fd_flag:
                self._wake_fd_sleeper()
        return events

    def _wake_fd_sleeper(self) -> None:
        # The sleeper is in trio's wait_readable, which only a cancel scope or
        # notify_closing can end early. A cancel scope entered around every
        # sleep is paid on every message, woken or not (README, Performance).
        # notify_closing costs nothing until a wake is needed. It makes wait_readable raise
        # ClosedResourceError and drops the FD from trio's epoll set; the next
        # wait registers it again. The FD is not closing: _sleep_on_fd tells
        # the two apart by self._closed, which close() sets before its own
        # notify_closing.
        self._fd_flag = 0  # one wake per sleep
        trio.lowlevel.notify_closing(self._fd)

    async def _wait_for(self, flag: int, events_just_read: bool = False) -> bool:
        """Wait until EVENTS has ``flag``, or may have it (spurious wake-ups
        are fine: callers retry their non-blocking call and come back).

        ``events_just_read``: the caller read EVENTS through _read_events
        (waking whoever was ready) and found no ``flag``, with no checkpoint
        since, so the first read here is skipped: whatever arrived after that
        read signals the FD again.

        Returns whether it slept, i.e. whether this was a full checkpoint:
        when EVENTS already has ``flag`` it returns without yielding.
        """
        slept = False
        self._n_waiting += 1
        if flag == _POLLIN:
            self._n_waiting_recv += 1
        else:
            self._n_waiting_send += 1
        try:
            while True:
                self._check_open()
                if events_just_read:
                    events_just_read = False
                elif self._read_events() & flag:
                    return slept
                slept = True
                if not self._fd_sleeping:
                    await self._sleep_on_fd(flag)
                else:
                    # Someone else sleeps on the FD (pitfall 4): wait to be
                    # woken by its EVENTS reads or handed the FD when it leaves.
                    lot = self._recv_lot if flag == _POLLIN else self._send_lot
                    await lot.park()
        finally:
            self._n_waiting -= 1
            if flag == _POLLIN:
                self._n_waiting_recv -= 1
            else:
                self._n_waiting_send -= 1

    async def _sleep_on_fd(self, flag: int) -> None:
        self._fd_sleeping = True
        self._fd_flag = flag
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:
            if self._closed:
                raise trio.ClosedResourceError(
                    "this zmq socket was closed while a task waited on it"
                ) from None
            # Woken by _wake_fd_sleeper: the caller reads EVENTS again.
        finally:
            self._fd_sleeping = False
            self._fd_flag = 0
            # Hand the FD over: parked tasks wake, read EVENTS, and one
            # of them (or this task, on its next loop) sleeps on the FD.
            # Done on every exit, cancellation included, or parked tasks
            # would wait for an FD sleeper that no longer exists.
            if self._recv_lot:
                self._recv_lot.unpark_all()
            if self._send_lot:
                self._send_lot.unpark_all()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<TrioSocket type={self._sock.socket_type} {state}>"


def make_socket(
    ctx: zmq.Context,
    socket_type: int,
    *,
    hwm: int | None = None,
    linger_ms: int = DEFAULT_LINGER_MS,
    options: Mapping[int, int | bytes] | None = None,
) -> TrioSocket:
    """Create a socket of ``socket_type`` with its options set, wrapped for trio.

    Options are set here, before any bind/connect, because HWM and most
    other options set later are silently ignored for pipes that already
    exist (pitfall 8). ``hwm`` sets both SNDHWM and RCVHWM (0 = no limit);
    ``options`` is applied after it and may override either.
    """
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        if hwm is not None:
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        return TrioSocket(sock)
    except BaseException:
        sock.close(linger=0)
        raise


# What the service modules need from zmq, re-exported so that this stays the one
# module importing both trio and zmq.
PUB: Final = zmq.PUB
SUB: Final = zmq.SUB
DEALER: Final = zmq.DEALER
ROUTER: Final = zmq.ROUTER
REP: Final = zmq.REP
IDENTITY: Final = zmq.IDENTITY
RCVHWM: Final = zmq.RCVHWM
SNDHWM: Final = zmq.SNDHWM
ROUTER_MANDATORY: Final = zmq.ROUTER_MANDATORY
MAXMSGSIZE: Final = zmq.MAXMSGSIZE
ZMQError = zmq.ZMQError


ZAP_DOMAIN: Final = zmq.ZAP_DOMAIN
EVENT_ACCEPTED: Final = int(zmq.EVENT_ACCEPTED)
EVENT_DISCONNECTED: Final = int(zmq.EVENT_DISCONNECTED)


def open_monitor(sock: TrioSocket, events: int) -> TrioSocket:
    """A socket on which libzmq reports ``events`` of ``sock``'s connections."""
    return TrioSocket(sock.zmq_socket.get_monitor_socket(events))


def parse_monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """(event, value) of one monitor message (value: the fd for accept/disconnect)."""
    event = zmq.utils.monitor.parse_monitor_message(frames)
    return int(event["event"]), int(event["value"])


def new_context() -> zmq.Context:
    """A fresh context per service, so closing one never disturbs another."""
    return zmq.Context()


async def send_in_turn(
    sock: TrioSocket, lock: trio.Lock, frames: list[_Buffer], deadline: float = math.inf
) -> bool:
    """Send one multipart message after every send already waiting on ``lock``.

    Several tasks share a socket and must not interleave their waits, so a sender
    that finds no room waits holding ``lock``. When nobody holds it and libzmq has
    room, the message goes out at once with no scheduler pass: on the hot paths
    (replies, acks) that pass costs more than the send, once per message. A call
    whose scope is already cancelled sends nothing, but one that sends at once
    does not yield, which callers that loop must keep in mind.

    Returns False, having sent nothing, when there was no room before ``deadline``
    (trio's clock). Only a send that has to wait pays for that cancel scope.
    """
    await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled send sends nothing
    if not lock.locked():
        try:
            sock.send_multipart_nowait(frames)
            return True
        except WouldBlock:
            pass
    with trio.move_on_at(deadline):
        async with lock:
            await sock.send_multipart(frames)
            return True
    return False
