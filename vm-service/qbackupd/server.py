# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's trio server: a Unix socket that qrexec connects to, one
session per connection (qrexec header, hello, requests), in-band errors.

Per connection three tasks run: a reader decodes and validates frames into a
bounded channel, a worker executes requests strictly in order (storage calls
block, so they run in a thread), and a writer sends the encoded responses.
The daemon keeps reading while it writes, and a full response channel stops
the worker and then the reader (back-pressure), so a client that reads
concurrently never deadlocks. However a connection ends, its repository is
closed: what was put is sealed and the writer lock released.

The listening socket is either bound by the daemon itself (`--socket PATH`,
for the simulation and tests) or inherited from systemd socket activation
(`qbackupd.socket`, sd_listen_fds(3): LISTEN_PID/LISTEN_FDS, fd 3). Either
way the peer's credentials are checked on every connection (SO_PEERCRED):
only root — qrexec-agent, which connects itself for calls made as user root —
and the daemon's own user may talk to it (DESIGN §2.11).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from . import frames
from .check import check_repository
from .frames import ProtocolError, Request
from .gc import collect_garbage
from .monitor import Cancelled
from .storage import Locked, MissingRefs, Repository, Storage, StorageError
from .usage import usage

log = logging.getLogger("qbackupd")

SERVER_NAME = f"qbackupd/{version('qbackupd')}"
REQUEST_QUEUE = 64  # decoded requests waiting for the worker...
QUEUED_BYTES = 16 << 20  # ...holding at most this many frame bytes (or one larger frame)
PUT_BATCH = 64  # puts handed to a storage thread at once...
PUT_BATCH_BYTES = 8 << 20  # ...up to about this many bytes of blobs
RESPONSE_QUEUE = 8  # encoded frames waiting for the writer
WRITE_COALESCE = 1 << 20  # small frames are joined into one send up to this size
MAX_LISTED_REFS = 64  # ids named in a missing_refs error
GET_CHUNK = 4 << 20  # a get reads blobs in a worker thread until this many bytes, then sends them
STAT_KEYS = ("packs", "blobs", "bytes", "snapshots", "pack_bytes", "fs_size", "fs_free")
# Bounds of a `check` answer (PROTOCOL.md §5): it must fit one frame.
MAX_PROBLEMS = 100
MAX_PROBLEM_CHARS = 300
MAX_DAMAGED = 4096
MAX_AFFECTED = 4096
MAX_AFFECTED_ROOTS = 1024  # per snapshot
LONG_OPS = frozenset({"gc", "check", "usage"})  # run in a thread, with progress frames


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed fd


class ServerError(Exception):
    """The server cannot start (socket path in use, not a socket, ...)."""


def default_allowed_uids() -> frozenset[int]:
    """Who may connect: root (qrexec-agent connects itself for calls made as
    user root) and the daemon's own user, who can read and write the storage
    directly anyway. Never the qube's unprivileged `user`."""
    return frozenset({0, os.geteuid()})


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected a Unix socket (SO_PEERCRED)."""
    fmt = "3i"
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return pid, uid, gid


class Connection:
    """One client session, from the qrexec header to the close."""

    def __init__(
        self, storage: Storage, stream: trio.SocketStream, number: int, allowed_uids: frozenset[int] | None = None
    ):
        self.storage = storage
        self.stream = stream
        self.number = number
        self.allowed_uids = default_allowed_uids() if allowed_uids is None else allowed_uids
        self.decoder = frames.Decoder()
        self.header: frames.Header | None = None
        self.repo: Repository | None = None
        self.writable = False
        self.hello_done = False
        self.version = frames.PROTOCOL_VERSION  # until hello says otherwise
        self.ops = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.result = "closed before header"
        self.peer_gone = False  # the client stopped reading before all answers were sent
        self.queued_bytes = 0  # frame bytes of the requests waiting for the worker
        self.dequeued = trio.Event()  # set when the worker takes one

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._accept_peer() and await self._accept_header():
                await self._session()
        except Exception:
            log.exception("conn %d: unexpected failure", self.number)
            self.result = "internal error"
        finally:
            with trio.CancelScope(shield=True):
                await self._close_repository()
                await self.stream.aclose()
            log.info(
                "conn %d: source=%s repo=%s ops=%d in=%d out=%d result=%s%s",
                self.number,
                frames.describe(self.header.untrusted_source) if self.header else "-",
                self.header.repo if self.header and self.header.repo else "-",
                self.ops,
                self.bytes_in,
                self.bytes_out,
                self.result,
                " (client went away)" if self.peer_gone else "",
            )

    async def _accept_peer(self) -> bool:
        """Refuse (with a log line and an in-band error) a peer that is neither
        root nor the daemon's own user: the socket is root-only, so such a peer
        means the socket's mode or owner was changed."""
        try:
            pid, uid, gid = peer_credentials(self.stream.socket)
        except OSError as exc:
            self.result = f"refused: cannot read the peer's credentials: {exc}"
            log.warning("conn %d: %s", self.number, self.result)
            return False
        if uid in self.allowed_uids:
            return True
        allowed = ", ".join(f"uid {u}" for u in sorted(self.allowed_uids))
        log.warning(
            "conn %d: refused peer pid=%d uid=%d gid=%d: only %s may connect (dom0 must call "
            "qubes.BackupChunk as user root; the socket must not be reachable by other users)",
            self.number, pid, uid, gid, allowed,
        )  # fmt: skip
        await self._send_fatal(
            ProtocolError("forbidden", f"connection from uid {uid} refused: dom0 must call the service as user root")
        )
        return False

    async def _accept_header(self) -> bool:
        """Read and check the qrexec header; False if the connection must close."""
        try:
            while (raw := self.decoder.header()) is None:
                if not await self._receive():
                    return False
        except frames.HeaderError as exc:
            self.result = f"bad header: {exc}"
            return False
        try:
            self.header = frames.parse_header(raw)
        except frames.HeaderError as exc:
            await self._send_fatal(ProtocolError("bad_request", str(exc)))
            return False
        if not self.header.from_allowed_source:
            await self._send_fatal(ProtocolError("forbidden", "only dom0 may use this service"))
            return False
        self.result = "closed without bye"
        return True

    async def _send_fatal(self, error: ProtocolError) -> None:
        """Answer an error before the session started, then let the caller close."""
        self.result = f"error {error.code}: {error.message}"
        log.warning("conn %d: %s", self.number, self.result)
        try:
            await self._send_bytes(frames.encode_frame(self._error_frame(error)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _session(self) -> None:
        requests_in, requests_out = trio.open_memory_channel[tuple[Request | ProtocolError, int]](REQUEST_QUEUE)
        frames_in, frames_out = trio.open_memory_channel[bytes](RESPONSE_QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, requests_in)
            nursery.start_soon(self._worker, requests_out, frames_in)
            await self._writer(frames_out)
            nursery.cancel_scope.cancel()

    async def _close_repository(self) -> None:
        if self.repo is None:
            return
        repo, self.repo = self.repo, None
        try:
            await trio.to_thread.run_sync(repo.close)
        except (StorageError, OSError) as exc:
            log.error("conn %d: closing repository failed: %s", self.number, exc)
            self.result = f"close failed: {exc}"
        except Exception:  # a bug: must not take the daemon (and every other connection) down
            log.exception("conn %d: closing repository failed", self.number)
            self.result = "close failed: internal error"

    # --- the three tasks -------------------------------------------------------------

    async def _receive(self) -> bool:
        """Receive what arrives straight into the decoder's buffer; False at EOF or on a reset."""
        with self.decoder.receive_buffer() as buffer:
            try:
                count = await self.stream.socket.recv_into(buffer)
            except OSError:  # ECONNRESET and the like: the client is gone
                count = 0
        self.bytes_in += count
        self.decoder.received(count)
        return count > 0

    async def _next_request(self) -> Request | None:
        """The next validated request, None at a clean EOF; raises ProtocolError."""
        while (untrusted_msg := self.decoder.frame()) is None:
            if not await self._receive():
                if self.decoder.pending:
                    raise ProtocolError("bad_frame", "stream ended inside a frame")
                return None
        request = frames.validate_request(untrusted_msg, self.version)
        if request.op == "hello" and not self.hello_done:
            # the reader runs ahead of the worker: the next frames are validated for this version
            self.version = frames.negotiate(request.args["versions"]) or self.version
        return request

    async def _reader(self, requests: trio.MemorySendChannel[tuple[Request | ProtocolError, int]]) -> None:
        """Decode and validate requests into the queue, at most QUEUED_BYTES of
        frames ahead of the worker (a larger frame waits until the queue is empty)."""
        async with requests:
            while True:
                item: Request | ProtocolError | None
                try:
                    item = await self._next_request()
                except ProtocolError as exc:
                    item = exc
                if item is None:
                    return
                size = self.decoder.frame_size if isinstance(item, Request) else 0
                while self.queued_bytes and self.queued_bytes + size > QUEUED_BYTES:
                    self.dequeued = trio.Event()
                    await self.dequeued.wait()
                self.queued_bytes += size
                try:
                    await requests.send((item, size))
                except trio.BrokenResourceError:
                    return  # the worker has finished the session
                last = item.fatal if isinstance(item, ProtocolError) else item.op == "bye"
                if last:
                    return

    def _take(self, entry: tuple[Request | ProtocolError, int]) -> Request | ProtocolError:
        """A request out of the queue: its bytes no longer count against QUEUED_BYTES."""
        item, size = entry
        self.queued_bytes -= size
        self.dequeued.set()
        return item

    def _batches_put(self, item: Request | ProtocolError) -> bool:
        """Whether ``item`` is a put that can run in a batch of puts (else _handle answers it)."""
        return isinstance(item, Request) and item.op == "put" and self.writable and self.repo is not None

    async def _worker(
        self,
        requests: trio.MemoryReceiveChannel[tuple[Request | ProtocolError, int]],
        responses: trio.MemorySendChannel[bytes],
    ) -> None:
        """Carry out the requests in order. Consecutive puts already waiting
        in the queue go to the storage thread together (``_put_batch``)."""
        async with requests, responses:
            try:
                held = None
                while True:
                    if held is None:
                        try:
                            item = self._take(await requests.receive())
                        except trio.EndOfChannel:
                            break
                    else:
                        item, held = held, None
                    if not self._batches_put(item):
                        if await self._handle(item, responses):
                            break
                        continue
                    batch, size = [item], len(item.args["data"])
                    while len(batch) < PUT_BATCH and size < PUT_BATCH_BYTES:
                        try:
                            held = self._take(requests.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        if not self._batches_put(held):
                            break
                        batch.append(held)
                        size += len(held.args["data"])
                        held = None
                    if await self._put_batch(batch, responses):
                        break
            except trio.BrokenResourceError:
                return  # the writer is gone (client went away); the session's close does the rest
            await self._close_repository()  # before the writer's EOF tells the client we are done

    async def _writer(self, responses: trio.MemoryReceiveChannel[bytes]) -> None:
        """Send the answers. If the client goes away, keep draining them: the
        requests it sent completely are still carried out (so a re-run reuses
        what it put), only their answers are dropped."""
        async with responses:
            async for data in responses:
                if self.peer_gone:
                    continue
                chunks = [data]
                size = len(data)
                while size < WRITE_COALESCE:
                    try:
                        chunks.append(responses.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    size += len(chunks[-1])
                try:
                    await self._send_bytes(b"".join(chunks) if len(chunks) > 1 else data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.peer_gone = True
        if not self.peer_gone:
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.peer_gone = True

    async def _send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.bytes_out += len(data)

    # --- requests --------------------------------------------------------------------

    def _error_frame(self, error: ProtocolError) -> dict[str, Any]:
        return frames.error_message(error.rid, error.code, error.message, **error.extra)

    async def _handle(self, item: Request | ProtocolError, responses: trio.MemorySendChannel[bytes]) -> bool:
        """Answer one request (or report why it was invalid); True when the session ends."""

        async def reply(message: dict[str, Any]) -> None:
            await responses.send(frames.encode_frame(message))

        error: ProtocolError
        if isinstance(item, ProtocolError):
            error = item
            if not self.hello_done and not error.fatal:
                error = ProtocolError("bad_request", "first frame must be hello", error.rid)
        else:
            self.ops += 1
            try:
                return await self._dispatch(item, reply)
            except trio.BrokenResourceError:
                raise  # from `reply`: nobody reads the answers any more
            except Exception as exc:
                error = self._protocol_error(item, exc)
        return await self._answer_error(error, responses)

    def _protocol_error(self, req: Request, exc: Exception) -> ProtocolError:
        """The error frame answering a request that raised ``exc``."""
        if isinstance(exc, ProtocolError):
            error = exc
        elif isinstance(exc, Locked):
            error = ProtocolError(exc.code, str(exc), req.rid, holder=exc.holder)
        elif isinstance(exc, MissingRefs):
            error = ProtocolError(exc.code, str(exc), req.rid, ids=list(exc.ids[:MAX_LISTED_REFS]))
        elif isinstance(exc, StorageError):
            error = ProtocolError(exc.code, str(exc), req.rid)
        elif isinstance(exc, OSError):
            error = ProtocolError("io", f"storage error: {exc}", req.rid)
        else:
            log.error("conn %d: internal error in %s", self.number, req.op, exc_info=exc)
            error = ProtocolError("internal", f"internal error in {req.op}", req.rid)
        if error.rid is None:
            error.rid = req.rid
        return error

    async def _answer_error(self, error: ProtocolError, responses: trio.MemorySendChannel[bytes]) -> bool:
        """Log and answer an error; True if it ends the session."""
        log.warning("conn %d: error %s (rid %s): %s", self.number, error.code, error.rid, error.message)
        if error.fatal:
            self.result = f"error {error.code}: {error.message}"
        await responses.send(frames.encode_frame(self._error_frame(error)))
        return error.fatal

    async def _put_batch(self, batch: list[Request], responses: trio.MemorySendChannel[bytes]) -> bool:
        """Store consecutive puts with one hop to a storage thread, then answer
        each in order, exactly as if each had been carried out alone: a put
        that fails is answered its error, and the puts after it go on (from a
        new hop) unless that error ends the session. True when it does. The
        answers of a hop's stored puts go to the writer as one item, so they
        leave in one send (not one send, and one wakeup of the client, each)."""
        while batch:
            done = await trio.to_thread.run_sync(self._put_all, self.repo, batch)
            answers = []
            for req, outcome in zip(batch, done):
                self.ops += 1
                if isinstance(outcome, Exception):
                    if answers:
                        await responses.send(b"".join(answers))
                    if await self._answer_error(self._protocol_error(req, outcome), responses):
                        return True
                    answers = []
                else:
                    answers.append(frames.encode_frame({"op": "ok", "rid": req.rid, "stored": outcome}))
            if answers:
                await responses.send(b"".join(answers))
            batch = batch[len(done) :]
        return False

    @staticmethod
    def _put_all(repo: Repository, batch: list[Request]) -> list[bool | Exception]:
        """Put the blobs of ``batch`` in order, up to and including the first
        that fails (its exception is its outcome); in a thread."""
        done: list[bool | Exception] = []
        for req in batch:
            args = req.args
            try:
                done.append(repo.put(args["id"], args["type"], args["data"], args.get("refs")))
            except Exception as exc:
                done.append(exc)
                break
        return done

    async def _dispatch(self, req: Request, reply: Callable[[dict[str, Any]], Awaitable[None]]) -> bool:
        """Execute one request and send its answer(s); True when the session ends."""
        if req.op == "hello":
            await reply(self._hello(req))
            return False
        if not self.hello_done:
            raise ProtocolError("bad_request", "first frame must be hello", req.rid)
        if req.op == "bye":
            if self.repo is not None:
                repo, self.repo = self.repo, None
                await trio.to_thread.run_sync(repo.close)  # a failure to seal answers an error
            await reply({"op": "bye", "rid": req.rid, "status": "ok"})
            self.result = "ok"
            return True
        if req.op in ("init", "open"):
            await reply(await self._open(req))
            return False
        if self.repo is None:
            raise ProtocolError("no_repository", "no repository is open", req.rid)
        if req.op in frames.WRITE_OPS and not self.writable:
            raise ProtocolError("read_only", f"{req.op} needs the repository opened for writing", req.rid)
        if req.op in LONG_OPS:
            answer = await self._long(req, reply)
            await reply({**answer, "rid": req.rid})
            return False
        if req.op == "get":
            ids = req.args["ids"]
            while ids:
                found = await trio.to_thread.run_sync(self._read_blobs, self.repo, ids)
                for id_, blob in zip(ids, found):
                    if blob is None:
                        await reply({"op": "missing", "rid": req.rid, "id": id_})
                    else:
                        await reply({"op": "blob", "rid": req.rid, "id": id_, "type": blob[0], "data": blob[1]})
                ids = ids[len(found) :]
            await reply({"op": "done", "rid": req.rid})
            return False
        answer = await trio.to_thread.run_sync(self._call_storage, self.repo, req)
        await reply({**answer, "rid": req.rid})
        return False

    def _hello(self, req: Request) -> dict[str, Any]:
        if self.hello_done:
            raise ProtocolError("bad_request", "hello sent twice", req.rid)
        version = frames.negotiate(req.args["versions"])
        if version is None:
            raise ProtocolError(
                "unsupported_version",
                "no common protocol version",
                req.rid,
                versions=list(frames.SUPPORTED_VERSIONS),
            )
        self.hello_done = True
        self.version = version
        log.debug("conn %d: hello from %s", self.number, frames.describe(req.args["client"]))
        assert self.header is not None
        return {
            "op": "hello",
            "rid": req.rid,
            "version": version,
            "server": SERVER_NAME,
            "max_frame": frames.MAX_FRAME,
            "max_batch": frames.MAX_BATCH,
            "repo": self.header.repo,
        }

    async def _open(self, req: Request) -> dict[str, Any]:
        assert self.header is not None
        if self.repo is not None:
            raise ProtocolError("bad_request", f"{req.op}: a repository is already open", req.rid)
        name = self.header.repo
        if name is None:
            raise ProtocolError("bad_repo_name", self.header.repo_problem or "no repository name", req.rid)
        holder = f"qbackupd connection {self.number} from dom0"

        def open_repository() -> None:
            # set from the thread, so that a cancelled wait cannot lose (and leak) the Repository
            if req.op == "init":
                self.repo = self.storage.create(name, req.args["config"], req.args["pack_size"], holder)
            else:
                self.repo = self.storage.open(name, req.args["write"], holder)

        await trio.to_thread.run_sync(open_repository)
        assert self.repo is not None
        self.writable = req.op == "init" or req.args["write"]
        if req.op == "init":
            return {"op": "ok", "rid": req.rid}
        return {
            "op": "opened",
            "rid": req.rid,
            "config": self.repo.config,
            "pack_size": self.repo.pack_size,
            "format": self.repo.format,
        }

    @staticmethod
    def _read_blobs(repo: Repository, ids: list[bytes]) -> list[tuple[int, bytes] | None]:
        """Read the first blobs of `ids`, at least one, up to GET_CHUNK bytes; in a thread."""
        found: list[tuple[int, bytes] | None] = []
        size = 0
        for id_ in ids:
            if size >= GET_CHUNK:
                break
            blob = repo.get(id_)
            found.append(blob)
            size += len(blob[1]) if blob else 0
        return found

    @staticmethod
    def _call_storage(repo: Repository, req: Request) -> dict[str, Any]:
        """Run one simple (single-answer) request against the repository; in a thread."""
        args = req.args
        if req.op == "have":
            return {"op": "have", "missing": repo.have(args["ids"])}
        if req.op == "locate":
            return {"op": "locate", "keys": repo.locate(args["ids"])}
        if req.op == "flush":
            repo.flush()
        elif req.op == "commit":
            repo.commit(args["id"], args["data"], args["refs"])
        elif req.op == "set_config":
            repo.set_config(args["config"], args["expect"])
        elif req.op == "delete_snapshot":
            repo.delete_snapshot(args["id"])
        elif req.op == "delete_snapshots":
            repo.delete_snapshots(args["ids"])
        elif req.op == "list":
            snapshots = [{"id": id_, "size": size, "time": stime} for id_, size, stime in repo.list_snapshots()]
            return {"op": "list", "snapshots": snapshots}
        elif req.op == "get_snapshot":
            data, refs = repo.get_snapshot(args["id"])
            return {"op": "snapshot", "id": args["id"], "data": data, "refs": refs}
        elif req.op == "stats":
            stats = repo.stats()
            return {"op": "stats", **{key: stats[key] for key in STAT_KEYS}}
        else:
            raise AssertionError(f"unhandled op {req.op}")
        return {"op": "ok"}


    # --- long operations: garbage collection, check, usage ---------------------------

    async def _long(self, req: Request, reply: Callable[[dict[str, Any]], Awaitable[None]]) -> dict[str, Any]:
        """Run a long operation in a thread, sending its progress; stop it if the
        client goes away or the daemon stops (it is resumable or repeatable)."""
        if req.op == "gc" and self.writable:
            raise ProtocolError(
                "read_write",
                "gc needs the repository opened read-only: it takes the writer lock itself, for its last phase",
                req.rid,
            )
        stop = threading.Event()

        def stopped() -> bool:
            return stop.is_set() or self.peer_gone

        def progress(phase: str, done: int, total: int) -> None:
            message = {"op": "progress", "rid": req.rid, "phase": phase, "done": done, "total": total}
            try:
                trio.from_thread.run(reply, message)
            except BaseException:  # cancelled, or nobody reads any more
                stop.set()
                raise Cancelled("the connection is closing") from None

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                stop.set()

        outcome: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_cancelled)
            try:
                outcome.append(await trio.to_thread.run_sync(self._run_long, req, progress, stopped))
            except Exception as exc:  # carried out of the nursery as it is, not in an exception group
                outcome.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(outcome[0], Cancelled):
            raise StorageError(f"{req.op} stopped: {outcome[0]}")
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def _run_long(self, req: Request, progress, stop) -> dict[str, Any]:
        """The long operation itself; in a thread."""
        name = self.header.repo
        if req.op == "gc":
            summary = collect_garbage(
                self.storage,
                name,
                repack_below=req.args["repack_below"],
                dry_run=req.args["dry_run"],
                progress=progress,
                stop=stop,
                holder=f"qbackupd connection {self.number} from dom0 (gc)",
            )
            return {"op": "gc", **summary.as_dict()}
        if req.op == "check":
            report = check_repository(
                self.storage, name, read_data=req.args["read_data"], progress=progress, stop=stop
            )
            affected = [
                {"id": id, "roots": roots[:MAX_AFFECTED_ROOTS]} for id, roots in report.affected[:MAX_AFFECTED]
            ]
            return {
                "op": "check",
                "problems": [p[:MAX_PROBLEM_CHARS] for p in report.problems[:MAX_PROBLEMS]],
                "problems_total": len(report.problems),
                "damaged": sorted(report.damaged)[:MAX_DAMAGED],
                "damaged_total": report.damaged_total,
                "bad_snapshots": report.bad_snapshots[:MAX_AFFECTED],
                "affected": affected,
                "affected_total": len(report.affected),
                "complete": report.complete,
            }
        result = usage(self.storage, name, progress=progress, stop=stop)
        return {
            "op": "usage",
            "snapshots": [[id, blobs, size] for id, blobs, size in result.snapshots],
            "shared_blobs": result.shared_blobs,
            "shared_bytes": result.shared_bytes,
            "unreferenced_blobs": result.unreferenced_blobs,
            "unreferenced_bytes": result.unreferenced_bytes,
            "missing": result.missing,
            "unreadable": result.unreadable,
        }


# --- listening socket and process lifecycle ---------------------------------------


@dataclass
class Listener:
    """The listening socket, where it lives, and whether we remove it at exit."""

    sock: trio.socket.SocketType
    path: str
    owned: bool  # bound by us (--socket): unlink at exit; systemd's: leave it alone
    inode: int | None = None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse anything else at `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise ServerError(f"another process is listening on {path}")


async def bind_socket(path: Path) -> Listener:
    """Bind and listen on `path` ourselves (mode 0660: owner and group only)."""
    _clear_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # no window with a wider mode than 0660
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot bind {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(128)
    return Listener(sock, str(path), owned=True, inode=os.stat(path).st_ino)


def systemd_socket(environ: dict[str, str] | None = None) -> Listener:
    """The listening socket passed by systemd socket activation (sd_listen_fds(3)).

    Exactly one listening AF_UNIX stream socket must have been passed, to this
    very process. The LISTEN_* variables are removed so that no child sees them.
    """
    env = os.environ if environ is None else environ
    pid_text, fds_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if pid_text is None or fds_text is None:
        raise ServerError(
            "--systemd-socket: no socket passed (LISTEN_PID/LISTEN_FDS unset); start qbackupd.socket, "
            "or use --socket PATH"
        )
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        raise ServerError(f"--systemd-socket: LISTEN_PID={pid_text!r} names another process, not {os.getpid()}")
    if fds_text != "1":
        raise ServerError(
            f"--systemd-socket: expected exactly one socket, LISTEN_FDS={fds_text!r} "
            "(qbackupd.socket must have one ListenStream= and Accept=no)"
        )
    fd = SD_LISTEN_FDS_START
    try:
        std = socket.socket(fileno=fd)
    except OSError as exc:
        raise ServerError(f"--systemd-socket: fd {fd} is not a usable socket: {exc.strerror or exc}") from None
    try:
        listening = std.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if std.family != socket.AF_UNIX or std.type != socket.SOCK_STREAM or not listening:
            raise ServerError(
                f"--systemd-socket: fd {fd} is not a listening Unix stream socket "
                "(qbackupd.socket needs ListenStream=/path and Accept=no)"
            )
        std.set_inheritable(False)
        path = std.getsockname()
    except BaseException:
        std.detach()  # not ours to close on a refusal
        raise
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    return Listener(trio.socket.from_stdlib_socket(std), path or "(unnamed socket)", owned=False)


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, closing repositories and stopping", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def serve(
    storage: Storage,
    socket_path: Path | None = None,
    *,
    allowed_uids: frozenset[int] | None = None,
    listener: Listener | None = None,
) -> None:
    """Serve connections until SIGTERM/SIGINT, on `socket_path` (bound here)
    or on `listener` (e.g. from systemd_socket())."""
    if listener is None:
        if socket_path is None:
            raise ValueError("serve() needs socket_path or listener")
        listener = await bind_socket(socket_path)
    allowed = default_allowed_uids() if allowed_uids is None else allowed_uids
    counter = itertools.count(1)

    async def handler(stream: trio.SocketStream) -> None:
        await Connection(storage, stream, next(counter), allowed).run()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(listener.sock)])
            log.info(
                "%s listening on %s%s", SERVER_NAME, listener.path, "" if listener.owned else " (socket from systemd)"
            )
    finally:
        if listener.owned:
            try:
                if os.stat(listener.path).st_ino == listener.inode:
                    os.unlink(listener.path)
            except FileNotFoundError:
                pass
        log.info("stopped")


def _run_strict(async_fn: Callable[[], Awaitable[None]]) -> None:
    """trio.run, with nurseries that wrap what their tasks raise in an exception
    group on every trio version: strict exception groups are the default only
    from trio 0.25, and Debian 12 ships 0.22, whose nurseries let a lone error
    through bare. An error that ends the run alone is unwrapped, so that the
    command line reports it in one line, as it does any other error."""
    try:
        trio.run(async_fn, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None


def run(storage: Storage, socket_path: Path | None) -> None:
    """Run the server in the foreground until a signal stops it: on a socket
    bound at `socket_path`, or (None) on the one systemd passed."""
    if socket_path is None:
        _run_strict(partial(serve, storage, listener=systemd_socket()))
    else:
        _run_strict(partial(serve, storage, socket_path))
