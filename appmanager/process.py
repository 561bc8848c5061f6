"""A Process: one OS process of an app, and the core's side of its control channel.

This module holds the handoff data path (``docs/protocol/handoff.md``): sending a request with the
client's descriptor, reading ``D`` messages back, and what happens to in-flight requests when the
process dies. A process that says ``"connections": true`` in READY (ASGI, Rack) also takes whole
connections (``C``), reports them closed (``X``), counts their requests (``N``) and reports their
responses for the access log (``L``); one that serves them one request at a time (Rack) says when
a request runs long (``S``, then ``R``) and gives its idle connections back meanwhile (``B``).

"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING

from appmanager import errors
from appmanager.request import INLINE_LIMIT, Request, body_fd
from appmanager.session import Session
from appmanager.slots import ConnectionSlots
from appmanager.states import ProcessState, transition

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.group import Group
    from appmanager.output import OutputCapture
    from appmanager.preloader import Preloader

log = logging.getLogger("appmanager")

# After a process is asked to stop (its control channel closed), how long it gets before TERM,
# and then before KILL.
STOP_GRACE = 10.0
KILL_GRACE = 5.0

# The largest control message a process sends: D (a few numbers), or, from one that takes whole
# connections, L (three fields of up to 8 KiB). A small read is the cheaper on every request.
RECV_SIZE = 256
RECV_SIZE_CONNECTIONS = 65536
_X, _N, _L, _B, _S, _R = 0x58, 0x4E, 0x4C, 0x42, 0x53, 0x52
# A connection's slot (handoff.md, "Whole connections"): the request number, shifted left by two,
# and its state; RECEIVED: a request arrived and its response has not begun.
SLOT_STATE = 3
SLOT_RECEIVED = 1


class Process:
    """One OS process of an app.

    A Process outlives its Sessions and its OS process: it stays in its Group's list until the OS
    process is reaped, so that a request in flight on a dying process can still be answered (502).
    Invariants: ``sessions`` is empty unless the state is READY or STOPPING; at most ``concurrency``
    sessions when ``concurrency`` > 0.
    """

    def __init__(
        self,
        group: Group,
        pid: int,
        ctl: socket.socket,
        progress_fd: int,
        pidfd: int,
        output: OutputCapture,
        concurrency: int,
    ) -> None:
        self.group = group
        self.pid = pid
        self.state = ProcessState.SPAWNING
        self.ctl = ctl
        self.progress_fd = progress_fd
        self.pidfd = pidfd
        self.output = output
        self.concurrency = concurrency
        self.sessions: dict[int, Session] = {}
        self.seq = 0
        self.processed = 0
        self.spawned_at = time.time()
        self.last_used = time.monotonic()
        self.exit_status: int | None = None
        # The preloader that forked this process (smart spawning), which knows its exit status.
        self.preloader: Preloader | None = None
        # Requests after which this process is retired (max_requests, staggered); 0: no limit.
        self.request_limit = 0
        self.retire_reason = ""
        # Killed by the reaper for exceeding max_request_time: its clients get 504, not 502.
        self.timed_out = False
        self._exit_waiters: list[asyncio.Future[None]] = []
        self._lost = False
        self._loop = asyncio.get_running_loop()
        self._kill_timer: asyncio.TimerHandle | None = None
        # Whole connections (READY said "connections": true): their slots, and each one's slot
        # by its session's seq.
        self.takes_connections = False
        self.slots: ConnectionSlots | None = None
        self._slots: dict[int, int] = {}
        self.recv_size = RECV_SIZE
        # Said S (a request runs long, handoff.md "One request at a time"): no new connection
        # until R.
        self.busy = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start_serving(self) -> None:
        """The handshake is done: take requests."""
        self._loop.add_reader(self.pidfd, self._on_exit)
        self._loop.add_reader(self.ctl.fileno(), self._on_control)
        transition(self, ProcessState.READY)  # SPAWNING -> READY

    def abandon(self) -> None:
        """The spawn failed: kill what is left of the process and reap it when it exits."""
        self._lost = True
        self.ctl.close()
        self.signal(signal.SIGKILL)
        self._loop.add_reader(self.pidfd, self._on_exit)

    def stop(self) -> None:
        """Retire the process: no new requests; once idle, close its channel so it exits. One
        that holds whole connections is told at once (EOF on a half-closed channel), so that it
        closes those idle between requests; it still reports on the channel until it exits."""
        if self.state in (ProcessState.STOPPING, ProcessState.EXITED):
            return
        transition(self, ProcessState.STOPPING)  # READY/SPAWNING -> STOPPING
        if not self.sessions:
            self._close_channel()
        elif self.takes_connections and self._slots:
            self._half_close_channel()

    def retire(self, reason: str) -> None:
        """Stop taking requests and stop once the current ones are done, saying why."""
        if self.state is not ProcessState.READY:
            return
        self.retire_reason = reason
        log.info("process %d retired: %s", self.pid, reason)
        self.group.pool.emit("retired", app=self.group.name, pid=self.pid, reason=reason)
        self.stop()

    def exited_future(self) -> asyncio.Future[None]:
        """A future that is done once the OS process has been reaped."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self.state is ProcessState.EXITED:
            fut.set_result(None)
        else:
            self._exit_waiters.append(fut)
        return fut

    def kill_for_timeout(self) -> None:
        """A request ran past max_request_time: kill the process (its group too)."""
        self.timed_out = True
        self.signal(signal.SIGKILL)

    def _close_control(self) -> None:
        if self.ctl.fileno() >= 0:
            self._loop.remove_reader(self.ctl.fileno())
            self.ctl.close()

    def _close_channel(self) -> None:
        """Close the control channel: EOF tells the shim to exit; TERM, then KILL, follow if
        it does not."""
        self._close_control()
        if self._kill_timer is None and self.state is not ProcessState.EXITED:
            self._kill_timer = self._loop.call_later(STOP_GRACE, self._terminate)

    def _half_close_channel(self) -> None:
        """Shut down the core's side of the channel: EOF tells the shim to stop, and it can still
        report what it finishes; TERM, then KILL, follow if it does not exit."""
        try:
            self.ctl.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._kill_timer is None and self.state is not ProcessState.EXITED:
            self._kill_timer = self._loop.call_later(STOP_GRACE, self._terminate)

    def _terminate(self) -> None:
        if self.state is ProcessState.EXITED:
            return
        log.warning("process %d did not exit in %.0f s; sending TERM", self.pid, STOP_GRACE)
        self.signal(signal.SIGTERM)
        self._kill_timer = self._loop.call_later(KILL_GRACE, self._kill)

    def _kill(self) -> None:
        if self.state is ProcessState.EXITED:
            return
        log.warning("process %d did not exit after TERM; sending KILL", self.pid)
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        """Signal the process and its children (it leads its own process group)."""
        try:
            os.killpg(self.pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass  # not a group leader (forked by a preloader): signal the process alone
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    # -- the data path ---------------------------------------------------------------------------

    @property
    def counts_connections(self) -> bool:
        """Are its sessions whole connections (it takes them, and its app gets them), so that
        its load is how many it holds, not requests against its concurrency?"""
        return self.takes_connections and self.group.per_connection

    def can_take(self) -> bool:
        if self.state is not ProcessState.READY:
            return False
        if self.counts_connections:
            # Connections, not requests: as many as it is given, unless it said it is busy.
            return not self.busy
        return self.concurrency == 0 or len(self.sessions) < self.concurrency

    def handoff(self, conn: Connection, request: Request, keep_alive: bool) -> bool:
        """Pass ``request`` and the client's descriptor to the process. False when the process is
        already gone (the request was not delivered and may go elsewhere)."""
        self.seq += 1
        seq = self.seq
        bfd = body_fd(request)
        flags = b"K" if keep_alive else b""
        if request.upgrade:
            flags += b"U"
        if bfd is None:
            ancillary = conn.ancillary
        else:
            flags += b"F"
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", conn.fd, bfd))]
        header = b"Q %d %s %s %d %d\n" % (
            seq,
            flags or b"-",
            conn.meta,
            len(request.head),
            request.body_len,
        )
        try:
            self.ctl.sendmsg([header, request.head, request.body], ancillary)
        except OSError as exc:
            log.warning("process %d: handoff failed: %s", self.pid, exc)
            self._lost_channel()
            return False
        finally:
            request.discard()
        self.sessions[seq] = Session(seq, conn, self, request.head)
        if request.upgrade:
            conn.give_away()  # the process reads the connection now (a WebSocket, say)
        return True

    def _on_control(self) -> None:
        # One message per wake-up: the loop is level-triggered and calls again while more are
        # queued, and reading until EAGAIN would cost an extra syscall on every request.
        try:
            msg = self.ctl.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if not msg:
            self._lost_channel()
            return
        self._handle_control(msg)

    def _drain_control(self) -> None:
        """The process exited: handle what it said before it did and the core has not read yet
        (connections given back or closed, counts, responses finished), before what it still
        held is answered as lost."""
        while not self._lost and self.ctl.fileno() >= 0:
            try:
                msg = self.ctl.recv(self.recv_size, socket.MSG_DONTWAIT)
            except OSError:
                return
            if not msg:
                return
            self._handle_control(msg)

    def _handle_control(self, msg: bytes) -> None:
        if msg[0:2] != b"D ":
            self._on_connection_message(msg[0], msg)
            return
        fields = msg.split(b" ")
        session = self.sessions.pop(int(fields[1]), None)
        if session is None:
            log.error("process %d reported unknown request %s", self.pid, fields[1])
            return
        self.processed += 1
        self.last_used = time.monotonic()
        status = size = None
        if len(fields) >= 5 and fields[3].isdigit() and fields[4].isdigit():
            status, size = int(fields[3]), int(fields[4])
        self.group.on_session_done(self, session, fields[2].startswith(b"k"), status, size)
        if self.state is ProcessState.STOPPING and not self.sessions:
            self._close_channel()

    # -- whole connections -----------------------------------------------------------------------

    def handoff_connection(self, conn: Connection, data: bytes) -> bool:
        """Give the whole connection to the process (``C``), with the bytes already read from it
        (at least a request head). False when the process is already gone."""
        assert self.slots is not None
        self.seq += 1
        seq = self.seq
        data = conn.with_buffered(data)
        slot = self.slots.take()
        # Request 1 has arrived: should the process die before it reads the message, 502.
        self.slots.write(slot, 1 << 2 | SLOT_RECEIVED)
        inline = len(data) <= INLINE_LIMIT
        header = b"C %d %d %s %s %d\n" % (seq, slot, b"-" if inline else b"F", conn.meta, len(data))
        data_fd = -1
        try:
            if inline:
                self.ctl.sendmsg([header, data], conn.ancillary)
            else:
                # A SEQPACKET message must fit the socket's buffer: a long start goes as a file.
                data_fd = os.memfd_create("appmanager-connection", os.MFD_CLOEXEC)
                os.write(data_fd, data)
                fds = struct.pack("ii", conn.fd, data_fd)
                self.ctl.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            log.warning("process %d: handoff failed: %s", self.pid, exc)
            self.slots.free(slot)
            self._lost_channel()
            return False
        finally:
            if data_fd >= 0:
                os.close(data_fd)
        self._slots[seq] = slot
        self.sessions[seq] = Session(seq, conn, self)
        self.last_used = time.monotonic()
        conn.give_away()
        return True

    def _on_connection_message(self, kind: int, msg: bytes) -> None:
        """``X``, ``N``, ``L``, ``S``, ``B`` or ``R``: from a process that takes connections."""
        try:
            if kind == _X:
                _, seq, count = msg.split(b" ")
                self._count_requests(int(count))
                self._connection_closed(int(seq))
            elif kind == _N:
                self._count_requests(int(msg[2:]))
            elif kind == _L:
                self._log_response(msg)
            elif kind == _B:
                first, _, data = msg.partition(b"\n")
                _, seq, count = first.split(b" ")
                self._count_requests(int(count))
                self._connection_closed(int(seq), data)
            elif kind == _S:
                self.busy = True
            elif kind == _R:
                self.busy = False
                if self.state is ProcessState.READY:
                    self.group.serve_waiting(self)
            else:
                log.error("process %d sent an unknown message %r", self.pid, msg[:40])
        except ValueError:
            log.error("process %d sent a malformed message %r", self.pid, msg[:80])

    def _count_requests(self, count: int) -> None:
        """Requests served on the process's connections (N, X): max_requests counts them."""
        if count <= 0:
            return
        self.processed += count
        self.last_used = time.monotonic()
        self.group.on_requests_counted(self, count)

    def _connection_closed(self, seq: int, returned: bytes | None = None) -> None:
        """``X``: the process closed connection ``seq``; or ``B`` (``returned`` is the data it
        read and did not serve): it gave the connection back, and the core reads it again, so
        that its next request goes to whichever process is free."""
        slot = self._slots.pop(seq, None)
        if slot is not None and self.slots is not None:
            self.slots.free(slot)
        session = self.sessions.pop(seq, None)
        if session is None:
            return
        if returned is not None:
            session.conn.take_back(returned)
        self.group.on_session_done(self, session, returned is not None)
        if self.state is ProcessState.STOPPING and not self.sessions:
            self._close_channel()

    def _log_response(self, msg: bytes) -> None:
        """``L <seq> <status> <bytes>``, then the request line, the referer and the user agent,
        a line each: one response on a connection, for the access log."""
        first, _, rest = msg.partition(b"\n")
        _, seq, status, size = first.split(b" ")
        session = self.sessions.get(int(seq))
        if session is None:
            return
        request, referer, agent = (rest.split(b"\n") + [b"", b""])[:3]
        self.group.pool.log_access_line(
            session.conn,
            request.decode("latin-1") or "-",
            int(status) if status.isdigit() and 100 <= int(status) <= 999 else None,
            int(size) if size.isdigit() else None,
            referer.decode("latin-1") or None,
            agent.decode("latin-1") or None,
        )

    def oldest_request(self, now: float) -> float:
        """When the oldest request in flight began (``now`` when none): a ``Q`` request from
        its handoff; one on a whole connection from the first sweep that saw its number in the
        connection's slot, marked RECEIVED or RESPONDING."""
        oldest = now
        slots = self.slots
        for session in self.sessions.values():
            if not session.head:
                slot = self._slots.get(session.seq)
                if slot is None or slots is None or slots.width != 8:
                    continue  # Node's slots say nothing of when a request began
                value = slots.read(slot)
                if not value & SLOT_STATE:
                    session.mark = -1
                    continue
                if value != session.mark:
                    session.mark = value
                    session.started = now
            oldest = min(oldest, session.started)
        return oldest

    # -- death -----------------------------------------------------------------------------------

    def _lost_channel(self) -> None:
        """The control channel closed: the process is exiting or dead. Answer what it held."""
        if self._lost:
            return
        self._lost = True
        self._close_control()
        if self.state is ProcessState.READY:
            log.warning("process %d of app %s died unexpectedly", self.pid, self.group.name)
            transition(self, ProcessState.STOPPING)  # READY -> STOPPING: it takes no more requests
        sessions = list(self.sessions.values())
        self.sessions.clear()
        self._answer_lost(sessions)
        self.group.on_process_lost(self, had_sessions=bool(sessions))

    def finish_relayed(
        self,
        session: Session,
        request: Request,
        answered: bool,
        keep: bool,
        status: int | None,
        size: int,
    ) -> None:
        """A request the core relayed over a connection of its own (``relay.py``: generic apps,
        Node apps behind a connector) is over: count it and serve what waits, or answer 502
        when the app gave no response."""
        conn = session.conn
        if answered:
            self.processed += 1
            self.group.on_session_done(self, session, keep, status, size)
        else:
            conn.respond(errors.simple_response(502, "the app did not answer"), close=True)
            self.group.pool.log_access(conn, request.head, 502, None)
            self.group.serve_waiting(self)
        if self.state is ProcessState.STOPPING and not self.sessions:
            self._close_channel()

    def _answer_lost(self, sessions: list[Session]) -> None:
        """Answer the requests a dead process held: 502 where its response had not begun (504
        when the reaper killed it for taking too long). A whole connection gets it when its slot
        says a request had arrived; otherwise it is closed."""
        started = self._started_seq()
        status = 504 if self.timed_out else 502
        for session in sessions:
            slot = self._slots.pop(session.seq, None)
            if slot is not None and self.slots is not None:
                state = self.slots.read(slot) & SLOT_STATE
                session.conn.on_process_lost(state != SLOT_RECEIVED, status)
                continue
            response_started = session.seq == started
            session.conn.on_process_lost(response_started=response_started, status=status)
            if not response_started:
                self.group.pool.log_access(session.conn, session.head, status, 0)

    def _started_seq(self) -> int:
        try:
            data = os.pread(self.progress_fd, 8, 0)
        except OSError:
            return -1
        return struct.unpack("<Q", data)[0] if len(data) == 8 else 0

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            code: int | None = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            # Not the core's child (yet): its preloader reaps it and reports the status.
            pid, code = self.pid, None
        if pid == 0:
            return
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.exit_status = code
        self._drain_control()
        self._lost_channel()
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        transition(self, ProcessState.EXITED)  # any -> EXITED
        if code is None and self.preloader is not None:
            self._log_exit_from_preloader(20)
        else:
            self._log_exit()
        if self.progress_fd >= 0:
            os.close(self.progress_fd)
        for fut in self._exit_waiters:
            if not fut.done():
                fut.set_result(None)
        self.group.on_process_exited(self)

    def _log_exit_from_preloader(self, tries: int) -> None:
        """The preloader's EXITED message may trail the pidfd by a moment: wait for it briefly."""
        assert self.preloader is not None
        code = self.preloader.exit_statuses.pop(self.pid, None)
        if code is None and tries > 0 and self.preloader.alive:
            self._loop.call_later(0.025, self._log_exit_from_preloader, tries - 1)
            return
        self.exit_status = code
        self._log_exit()

    def _log_exit(self) -> None:
        """The fixed exit line and the ``exited`` event, once the status is known."""
        code = self.exit_status
        self.group.pool.emit("exited", app=self.group.name, pid=self.pid, status=code)
        if code is None:
            log.info("process %d exited", self.pid)
        elif code < 0:
            log.info("process %d exited with signal %d", self.pid, -code)
        else:
            log.info("process %d exited with status %d", self.pid, code)

    def exited(self) -> bool:
        """Has the OS process exited (whether or not it was reaped yet)?"""
        # A pidfd becomes readable when its process exits; reaping is left to _on_exit.
        readable, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(readable)

    def verify_invariants(self) -> None:
        if self.state not in (ProcessState.READY, ProcessState.STOPPING):
            assert not self.sessions, "sessions on a process that is not serving"
        if self.concurrency > 0:
            assert len(self.sessions) <= self.concurrency
        for session in self.sessions.values():
            assert session.process is self
