"""--workers N: N gateway processes on one port, and the process that minds them.

Each worker is a whole gateway (`python -m gateway ... --workers 1 --reuse-port`)
with its own event loop and its own Redis connections, so the Redis connection
budget is N x pool size. The kernel spreads new client connections across the
workers (SO_REUSEPORT). Each worker's admin listener is a Unix socket in a
private directory; the supervisor's own admin listener answers /stats and
/metrics with the workers' documents added up, and /stats?per_worker=1 lists
them one by one.

The supervisor restarts a worker that exits (with backoff if it keeps dying).
It also asks each worker's admin socket for /healthz every second: a worker that
stops answering (stopped, deadlocked, its loop blocked) is reported at once in
/readyz (unready) and /stats (`workers.unresponsive`), and after
--worker-hang-timeout-s without an answer it is killed (SIGKILL) and so restarted;
meanwhile the kernel still queues new connections for it. On SIGTERM or SIGINT
the supervisor passes the signal on and waits for every worker to drain, killing
the ones still running after the shutdown timeout and a margin.
Workers are also told to exit if the supervisor itself dies (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import stats as stats_merge
from .app import ListenError, admin_application, admin_runner, json_response, start_site
from .config import Config
from .metrics import exposition, registry_for

log = logging.getLogger("gateway.supervisor")

# A worker that dies sooner than this after starting is restarted with growing delays.
_HEALTHY_AFTER_S = 5.0
_RESTART_DELAY_MAX_S = 10.0
# Beyond the workers' own shutdown timeout, before they are killed.
_STOP_MARGIN_S = 5.0
# How often each worker's admin socket is asked whether it is alive, and how long it may take to answer.
_PROBE_EVERY_S = 1.0
_PROBE_TIMEOUT_S = 1.0
# A worker just (re)started may take this long to open its admin socket before it can count as hung.
_STARTUP_GRACE_S = 10.0


class _Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.restarts = 0
        self.watcher: asyncio.Task[None] | None = None
        self.prober: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None
        # When its admin socket first failed to answer, while it has not answered since.
        self.unresponsive_since: float | None = None
        self.answered = False  # since it was (re)started
        self.hang_kills = 0

    def unresponsive_s(self, now: float) -> float | None:
        return None if self.unresponsive_since is None else now - self.unresponsive_since


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a worker orphaned by a killed supervisor would keep the port.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def check_port_free(host: str, port: int) -> None:
    """Raise ListenError if HOST:PORT is taken (workers bind with SO_REUSEPORT, which would hide it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {host}:{port}: {reason}") from exc


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self._argv = list(argv)
        self._dir = tempfile.TemporaryDirectory(prefix="gateway-workers-")
        self.workers = [_Worker(i, os.path.join(self._dir.name, f"worker-{i}.sock")) for i in range(config.workers)]
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._started = time.monotonic()

    # -- processes --------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.socket_path)
        # The worker's own options are appended last: argparse keeps the last value.
        args = [*self._argv, "--workers", "1", "--reuse-port", "--admin-listen", f"unix:{w.socket_path}"]
        env = {**os.environ, "GATEWAY_WORKER_INDEX": str(w.index)}
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, env=env, preexec_fn=_die_with_parent
        )
        w.started = time.monotonic()
        w.unresponsive_since = None
        w.answered = False

    async def _probe(self, w: _Worker) -> None:
        """Ask the worker's admin socket whether it is alive; kill it once it has not answered for
        the hang timeout (the watcher then restarts it, as for any exit)."""
        hang_timeout = self.config.worker_hang_timeout_s
        while not self._stopping:
            await asyncio.sleep(_PROBE_EVERY_S)
            proc = w.proc
            if proc is None or proc.returncode is not None:
                continue  # exited: the watcher restarts it
            reply = await self._fetch(w, "/healthz", _PROBE_TIMEOUT_S)
            if self._stopping or proc is not w.proc:
                continue
            now = time.monotonic()
            if reply is not None:
                if w.unresponsive_since is not None:
                    log.warning(
                        "worker %d (pid %d) answers again after %.1f s", w.index, proc.pid, now - w.unresponsive_since
                    )
                w.unresponsive_since = None
                w.answered = True
                continue
            if w.unresponsive_since is None:
                w.unresponsive_since = now
                log.warning("worker %d (pid %d) does not answer its admin socket", w.index, proc.pid)
            # A worker still starting has not opened its admin socket yet: it gets the grace first.
            since = w.unresponsive_since if w.answered else max(w.unresponsive_since, w.started + _STARTUP_GRACE_S)
            if now >= since + hang_timeout:
                log.error(
                    "worker %d (pid %d) has not answered for %.0f s; killing it (SIGKILL) to restart it",
                    w.index,
                    proc.pid,
                    now - w.unresponsive_since,
                )
                w.hang_kills += 1
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _watch(self, w: _Worker) -> None:
        delay = 0.5
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - w.started
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if lived >= _HEALTHY_AFTER_S:
                delay = 0.5
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s", w.index, w.proc.pid, how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_DELAY_MAX_S)
            if self._stopping:
                return
            await self._spawn(w)
            w.restarts += 1

    async def start(self) -> None:
        """Start every worker and the admin listener; ListenError if the port is taken."""
        host, port = self.config.listen
        check_port_free(host, port)
        for w in self.workers:
            await self._spawn(w)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        for w in self.workers:
            w.watcher = asyncio.create_task(self._watch(w))
            w.prober = asyncio.create_task(self._probe(w))
        if self.config.admin_listen is not None:
            self._runner = admin_runner(self.admin_app(), self.config)
            await self._runner.setup()
            try:
                await start_site(self._runner, self.config.admin_listen)
            except ListenError:
                await self.stop()
                raise

    async def _wait_ready(self) -> None:
        """Until every worker answers on its admin socket; a worker that exits first fails the start."""
        deadline = time.monotonic() + 30
        pending = list(self.workers)
        while pending:
            for w in list(pending):
                assert w.proc is not None
                if w.proc.returncode is not None:
                    raise ListenError(f"worker {w.index} exited with status {w.proc.returncode} while starting")
                if await self._fetch(w, "/healthz") is not None:
                    w.answered = True
                    pending.remove(w)
            if time.monotonic() > deadline:
                raise ListenError(f"{len(pending)} worker(s) did not start within 30 s")
            if pending:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        grace = self.config.shutdown_timeout_s + _STOP_MARGIN_S
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                async with asyncio.timeout(grace):
                    await w.proc.wait()
            except TimeoutError:
                log.error("worker %d (pid %d) did not stop in %.0f s; killing it", w.index, w.proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        for w in self.workers:
            for task in (w.watcher, w.prober):
                if task is not None:
                    task.cancel()
            if w.session is not None:
                await w.session.close()
        self._dir.cleanup()

    # -- admin ------------------------------------------------------------------

    async def _fetch(self, w: _Worker, path: str, timeout: float = 5.0) -> tuple[int, Any] | None:
        """(status, JSON body) from a worker's admin socket, or None if it does not answer."""
        if w.session is None:
            w.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=w.socket_path))
        try:
            async with w.session.get(f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None

    async def _fetch_answering(self, w: _Worker, path: str) -> tuple[int, Any] | None:
        # A worker known not to answer is not waited for: /stats and /readyz stay fast.
        if w.unresponsive_since is not None:
            return None
        return await self._fetch(w, path)

    async def worker_stats(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._fetch_answering(w, "/stats") for w in self.workers))
        now = time.monotonic()
        out = []
        for w, reply in zip(self.workers, replies, strict=True):
            unresponsive = w.unresponsive_s(now)
            entry: dict[str, Any] = {
                "index": w.index,
                "pid": w.proc.pid if w.proc is not None else None,
                "restarts": w.restarts,
                "unresponsive_s": None if unresponsive is None else round(unresponsive, 1),
                "killed_unresponsive": w.hang_kills,
                "stats": reply[1] if reply is not None and reply[0] == 200 else None,
            }
            out.append(entry)
        return out

    async def stats(self, per_worker: bool = False) -> dict[str, Any]:
        workers = await self.worker_stats()
        doc = stats_merge.merge([w["stats"] for w in workers if w["stats"] is not None])
        doc.setdefault("mode", self.config.mode)
        doc["workers"] = {
            "configured": len(self.workers),
            "answering": sum(1 for w in workers if w["stats"] is not None),
            "restarts": sum(w["restarts"] for w in workers),
            "unresponsive": sum(1 for w in workers if w["unresponsive_s"] is not None),
            "killed_unresponsive": sum(w["killed_unresponsive"] for w in workers),
            "supervisor_uptime_s": round(time.monotonic() - self._started, 3),
        }
        if per_worker:
            doc["per_worker"] = workers
        return doc

    async def _stats_view(self, request: web.Request) -> web.Response:
        per_worker = request.query.get("per_worker", "") not in ("", "0", "false")
        return json_response(await self.stats(per_worker))

    async def _metrics_view(self, request: web.Request) -> web.Response:
        doc = await self.stats()
        body = exposition(registry_for(lambda: doc))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _live_view(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "workers": len(self.workers)})

    async def _ready_view(self, request: web.Request) -> web.Response:
        replies = await asyncio.gather(*(self._fetch_answering(w, "/readyz") for w in self.workers))
        ready = sum(1 for r in replies if r is not None and r[0] == 200)
        status = 200 if ready == len(self.workers) else 503
        body = {
            "status": "ready" if status == 200 else "unready",
            "workers_ready": ready,
            "workers": len(replies),
            "workers_unresponsive": sum(1 for w in self.workers if w.unresponsive_since is not None),
        }
        return web.json_response(body, status=status)

    def admin_app(self) -> web.Application:
        return admin_application(self._stats_view, self._metrics_view, self._live_view, self._ready_view)


async def supervise(config: Config, argv: Sequence[str]) -> int:
    sup = Supervisor(config, argv)
    try:
        await sup.start()
    except ListenError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    pids = ", ".join(str(w.proc.pid) for w in sup.workers if w.proc is not None)
    admin = config.admin_listen
    where = "off" if admin is None else f"unix:{admin}" if isinstance(admin, str) else f"{admin[0]}:{admin[1]}"
    log.info(
        "supervising %d workers (pids %s) on %s:%d, mode=%s; admin %s",
        len(sup.workers),
        pids,
        *config.listen,
        config.mode,
        where,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining %d workers", len(sup.workers))
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    loop.remove_signal_handler(signal.SIGINT)
    await sup.stop()
    log.info("stopped")
    return 0
