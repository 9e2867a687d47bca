#!/usr/bin/env python3
"""HTTP/3 load client on aioquic: a second, independent HTTP/3 + QUIC stack against Baton's proxy.

The same command line (a subset) and the same single JSON line on stdout as `h3-load`, the Rust
client on quinn + h3, so a test can run either and read the same result:

    h3_aioquic_client.py --connect IP:PORT --server-name NAME --ca CA.pem [--authority HOST]
        --connections N --concurrency C --duration-ms D
        [--large-bytes 500000] [--small-bytes 1000] [--post-bytes 65536]
        [--keep-alive-ms 1000] [--idle-timeout-ms 30000] [--progress]

It opens N QUIC connections (ALPN h3), runs an H3Connection over each (aioquic's asyncio
QuicConnectionProtocol), and on each connection C request loops until D ms have passed; each loop
goes round-robin through GET /bytes/{small}?seed=s, GET /bytes/{large}?seed=s and POST /echo with a
pattern body of post-bytes (seed s), s a counter unique per request. A response counts as failed
unless its status is 200 and its body is byte-exact (the pattern, or the posted body). A connection
that terminates before we close it is counted (connection_errors) and re-dialed (reconnects) while
time remains; its in-flight requests count as failed. handshakes counts dials: N + reconnects.
At the end in-flight requests finish and each connection closes with H3_NO_ERROR. Then one line:

    {"requests":R,"failed":F,"bytes":B,"connections":N,"handshakes":H,"reconnects":X,
     "connection_errors":E,"p50_ms":..,"p99_ms":..,"max_ms":..,"errors":[first 10 messages]}

requests counts every request that ended (F of them failed); bytes counts response body bytes
received; the latencies are those of the requests that succeeded. Exit code 0 if it ran to the end
(even with failures), 1 if it could not start (bad arguments or CA file, or no dial ever completed
its handshake). Logs go to stderr; --progress prints one JSON progress line per second there.
Start-up takes about a second (the pattern table below is built before the first dial, and the
duration counts from after it).

The body pattern: byte i of a body with seed s is ((i * 2654435761 + s * 40503) >> 16) & 0xFF.
"""

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset

log = logging.getLogger("h3-aioquic-client")

INDEX_MUL = 2654435761
SEED_MUL = 40503
PERIOD = 1 << 24
MAX_ERRORS = 10

# The pattern's byte i depends only on bits 16..23 of i*INDEX_MUL + s*SEED_MUL, so only on that sum
# mod 2^24; INDEX_MUL is odd, hence invertible mod 2^24, and seed s shifts the index by
# s*SEED_MUL/INDEX_MUL (mod 2^24). Every body is therefore a (wrapping) slice of one table of the
# seed-0 pattern over one period, built once (16 MiB, under a second).
_TABLE = None
_INDEX_MUL_INV = pow(INDEX_MUL, -1, PERIOD)


def _table():
    global _TABLE
    if _TABLE is None:
        step = INDEX_MUL % PERIOD
        _TABLE = bytes((h >> 16) & 0xFF for h in range(0, step * PERIOD, step))
    return _TABLE


def pattern_byte(seed, i):
    """Byte i of the pattern with seed (the definition, for checks)."""
    return ((i * INDEX_MUL + seed * SEED_MUL) >> 16) & 0xFF


def pattern(seed, offset, n):
    """Bytes offset .. offset+n of the pattern with seed."""
    table = _table()
    start = ((seed * SEED_MUL * _INDEX_MUL_INV) + offset) % PERIOD
    out = bytearray()
    while n > 0:
        take = min(n, PERIOD - start)
        out += table[start : start + take]
        n -= take
        start = 0
    return bytes(out)


class ConnectionLost(Exception):
    """The QUIC connection ended while a request was in flight."""


class Pending:
    """One request in flight: what it expects and what has arrived."""

    def __init__(self, future, expected, label):
        self.future = future
        self.expected = expected  # the exact body expected
        self.label = label
        self.status = None
        self.received = 0
        self.error = None

    def on_headers(self, headers):
        for name, value in headers:
            if name == b":status":
                self.status = int(value)
        if self.status != 200 and self.error is None:
            self.error = f"{self.label}: status {self.status}"

    def on_data(self, data):
        if self.status is None and self.error is None:
            self.error = f"{self.label}: data before headers"
        end = self.received + len(data)
        if self.error is None:
            if end > len(self.expected):
                self.error = (
                    f"{self.label}: body longer than {len(self.expected)} bytes"
                )
            elif data != self.expected[self.received : end]:
                first = next(
                    k
                    for k in range(len(data))
                    if data[k] != self.expected[self.received + k]
                )
                self.error = f"{self.label}: body differs at byte {self.received + first}"
        self.received = end

    def finish(self):
        if self.error is None and self.received != len(self.expected):
            self.error = f"{self.label}: body {self.received} bytes, expected {len(self.expected)}"
        if not self.future.done():
            self.future.set_result((self.error, self.received))

    def fail(self, exc):
        if not self.future.done():
            self.future.set_exception(exc)


class H3Client(QuicConnectionProtocol):
    """One QUIC connection with an HTTP/3 client on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._pending = {}
        self.closing = False  # we closed it (graceful end)
        self.terminated = None  # the ConnectionTerminated event, once it ended

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            exc = ConnectionLost(
                f"connection terminated: error 0x{event.error_code:x} {event.reason_phrase!r}"
            )
            for p in self._pending.values():
                p.fail(exc)
            self._pending.clear()
        elif isinstance(event, StreamReset):
            p = self._pending.pop(event.stream_id, None)
            if p is not None:
                p.error = p.error or f"{p.label}: stream reset, error 0x{event.error_code:x}"
                p.finish()
        for h3_event in self._http.handle_event(event):
            p = self._pending.get(h3_event.stream_id)
            if p is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                p.on_headers(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                p.on_data(h3_event.data)
            if getattr(h3_event, "stream_ended", False):
                del self._pending[h3_event.stream_id]
                p.finish()

    async def request(self, method, authority, path, body, expected, label):
        """Sends one request; returns (error or None, body bytes received)."""
        if self.terminated is not None:
            raise ConnectionLost("connection already terminated")
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path.encode()),
            (b"user-agent", b"h3-aioquic-client"),
        ]
        if body is not None:
            headers += [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(body)).encode()),
            ]
        future = self._loop.create_future()
        self._pending[stream_id] = Pending(future, expected, label)
        self._http.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self._http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        try:
            return await future
        except asyncio.CancelledError:
            # Timed out: cancel the stream both ways (H3_REQUEST_CANCELLED) so it frees up.
            if self.terminated is None and not self.closing:
                code = ErrorCode.H3_REQUEST_CANCELLED
                try:
                    self._quic.stop_stream(stream_id, code)
                    self._quic.reset_stream(stream_id, code)
                except Exception as e:  # the stream may have ended meanwhile
                    log.debug("cancelling stream %d: %s", stream_id, e)
                self.transmit()
            raise
        finally:
            self._pending.pop(stream_id, None)


class Totals:
    def __init__(self):
        self.requests = 0
        self.failed = 0
        self.bytes = 0
        self.handshakes = 0
        self.completed_handshakes = 0
        self.reconnects = 0
        self.connection_errors = 0
        self.latencies = []
        self.errors = []
        self.seed = 0

    def next_seed(self):
        self.seed = (self.seed + 1) % PERIOD
        return self.seed

    def error(self, msg):
        log.warning("%s", msg)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    def percentile(self, q):
        if not self.latencies:
            return 0.0
        s = sorted(self.latencies)
        k = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
        return round(s[k], 3)

    def line(self, connections):
        return json.dumps(
            {
                "requests": self.requests,
                "failed": self.failed,
                "bytes": self.bytes,
                "connections": connections,
                "handshakes": self.handshakes,
                "reconnects": self.reconnects,
                "connection_errors": self.connection_errors,
                "p50_ms": self.percentile(0.50),
                "p99_ms": self.percentile(0.99),
                "max_ms": round(max(self.latencies), 3) if self.latencies else 0.0,
                "errors": self.errors,
            },
            separators=(",", ":"),
        )


async def request_loop(client, args, totals, deadline, timeout):
    """Round-robin over the request mix until the deadline or the connection's end."""
    authority = (args.authority or args.server_name).encode()
    k = 0
    while time.monotonic() < deadline.at and client.terminated is None:
        seed = totals.next_seed()
        kind = k % 3
        k += 1
        if kind == 0:
            n, method, body = args.small_bytes, b"GET", None
            path = f"/bytes/{n}?seed={seed}"
            expected = pattern(seed, 0, n)
        elif kind == 1:
            n, method, body = args.large_bytes, b"GET", None
            path = f"/bytes/{n}?seed={seed}"
            expected = pattern(seed, 0, n)
        else:
            method, path = b"POST", "/echo"
            body = pattern(seed, 0, args.post_bytes)
            expected = body
        label = f"{method.decode()} {path}" + (f" (seed {seed})" if body is not None else "")
        started = time.monotonic()
        try:
            error, received = await asyncio.wait_for(
                client.request(method, authority, path, body, expected, label), timeout
            )
        except ConnectionLost as e:
            totals.requests += 1
            totals.failed += 1
            totals.error(f"{label}: {e}")
            return
        except asyncio.TimeoutError:
            totals.requests += 1
            totals.failed += 1
            totals.error(f"{label}: no complete response in {timeout:.1f} s")
            continue
        totals.requests += 1
        totals.bytes += received
        if error is None:
            totals.latencies.append((time.monotonic() - started) * 1000.0)
        else:
            totals.failed += 1
            totals.error(error)


async def keep_alive(client, interval):
    while client.terminated is None and not client.closing:
        await asyncio.sleep(interval)
        if client.terminated is not None or client.closing:
            return
        try:
            await client.ping()
        except (ConnectionError, asyncio.CancelledError):
            return


async def run_connection(index, args, configuration, totals, deadline):
    """One of the N connections: dial, run the loops, re-dial after an error while time remains."""
    host, port = args.host, args.port
    timeout = max(args.idle_timeout_ms / 1000.0, 1.0)
    first = True
    while first or time.monotonic() < deadline.at:
        if not first:
            totals.reconnects += 1
        first = False
        totals.handshakes += 1
        client = None
        try:
            async with connect(
                host,
                port,
                configuration=configuration,
                create_protocol=H3Client,
                wait_connected=False,
            ) as dialed:
                client = dialed
                # wait_connected=False, then wait here with a bound: a lost handshake must not hang
                # (connect() leaves the first flight to us then).
                client.transmit()
                await asyncio.wait_for(client.wait_connected(), timeout)
                totals.completed_handshakes += 1
                log.info("connection %d: handshake complete", index)
                ka = None
                if args.keep_alive_ms > 0:
                    ka = asyncio.ensure_future(keep_alive(client, args.keep_alive_ms / 1000.0))
                loops = [
                    asyncio.ensure_future(request_loop(client, args, totals, deadline, timeout))
                    for _ in range(args.concurrency)
                ]
                await asyncio.gather(*loops)
                if ka is not None:
                    ka.cancel()
                if client.terminated is None:
                    client.closing = True
                    client.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase="done")
                    log.info("connection %d: closed", index)
                    return
                ev = client.terminated
                raise ConnectionLost(
                    f"connection terminated: error 0x{ev.error_code:x} {ev.reason_phrase!r}"
                )
        except (ConnectionLost, ConnectionError, OSError, asyncio.TimeoutError) as e:
            totals.connection_errors += 1
            what = str(e) or type(e).__name__
            if isinstance(e, asyncio.TimeoutError):
                what = f"handshake not complete in {timeout:.1f} s"
            elif not isinstance(e, ConnectionLost) and client is not None and client.terminated:
                ev = client.terminated
                what = f"connection failed: error 0x{ev.error_code:x} {ev.reason_phrase!r}"
            totals.error(f"connection {index}: {what}")
            # A short pause so a server that refuses at once is not dialed in a tight loop.
            await asyncio.sleep(0.1)


async def progress(totals, started):
    while True:
        await asyncio.sleep(1.0)
        print(
            json.dumps(
                {
                    "elapsed_ms": int((time.monotonic() - started) * 1000),
                    "requests": totals.requests,
                    "failed": totals.failed,
                    "bytes": totals.bytes,
                    "reconnects": totals.reconnects,
                    "connection_errors": totals.connection_errors,
                }
            ),
            file=sys.stderr,
            flush=True,
        )


class Deadline:
    """When the loops stop starting requests; SIGTERM or SIGINT moves it to now (the requests in
    flight finish, then the summary), so a test can stop the load when its migrations are done."""

    def __init__(self, at):
        self.at = at

    def now(self):
        self.at = min(self.at, time.monotonic())


async def main_async(args, configuration):
    totals = Totals()
    started = time.monotonic()
    deadline = Deadline(started + args.duration_ms / 1000.0)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, deadline.now)
    prog = asyncio.ensure_future(progress(totals, started)) if args.progress else None
    await asyncio.gather(
        *(
            run_connection(i, args, configuration, totals, deadline)
            for i in range(args.connections)
        )
    )
    if prog is not None:
        prog.cancel()
    return totals


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="HTTP/3 load client on aioquic (the h3-load command line, a subset)."
    )
    p.add_argument("--connect", required=True, help="IP:PORT ([IPv6]:PORT) to dial")
    p.add_argument("--server-name", required=True, help="TLS server name (SNI, verified)")
    p.add_argument("--ca", required=True, help="PEM file of the CA that signs the server")
    p.add_argument("--authority", help="the :authority of requests (default: --server-name)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration-ms", type=int, default=5000)
    p.add_argument("--large-bytes", type=int, default=500000)
    p.add_argument("--small-bytes", type=int, default=1000)
    p.add_argument("--post-bytes", type=int, default=65536)
    p.add_argument("--keep-alive-ms", type=int, default=1000, help="PING interval, 0 for none")
    p.add_argument("--idle-timeout-ms", type=int, default=30000)
    p.add_argument(
        "--progress", action="store_true", help="a JSON progress line per second on stderr"
    )
    args = p.parse_args(argv)
    host, sep, port = args.connect.rpartition(":")
    if not sep or not port.isdigit():
        p.error(f"--connect {args.connect!r}: not IP:PORT")
    args.host, args.port = host.strip("[]"), int(port)
    for name in ("connections", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("large_bytes", "small_bytes", "post_bytes"):
        if not 0 <= getattr(args, name) <= PERIOD:
            p.error(f"--{name.replace('_', '-')} must be 0..={PERIOD}")
    return args


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = parse_args(argv if argv is not None else sys.argv[1:])
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=args.server_name,
        idle_timeout=args.idle_timeout_ms / 1000.0,
        verify_mode=ssl.CERT_REQUIRED,
    )
    try:
        # aioquic reads the file only at the first handshake: check it here, so a bad path or PEM
        # fails at the start.
        ssl.create_default_context(cafile=args.ca)
        configuration.load_verify_locations(cafile=args.ca)
    except (OSError, ssl.SSLError) as e:
        log.error("cannot load the CA file %s: %s", args.ca, e)
        return 1
    _table()
    totals = asyncio.run(main_async(args, configuration))
    print(totals.line(args.connections), flush=True)
    if totals.completed_handshakes == 0:
        log.error("no connection completed its handshake")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
