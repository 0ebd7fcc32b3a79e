"""Open-loop, fixed-rate load: POST /api/v1/transactions at RATE requests/s for SECONDS, to 127.0.0.1 only.

Each request has a scheduled send time (start + i / RATE) and its latency is counted from that time, not from when
a connection became free, so a stalled server shows up in the percentiles instead of slowing the generator down
(no coordinated omission). Requests are sent on keep-alive connections; a new one is opened when all are busy, up to
MAX_CONNECTIONS. The run is bounded: exactly RATE * SECONDS requests, and it gives up 300 s after the last is sent.

The generator shares the machine with the server, so it is kept cheap: every request is built before the clock
starts, and one thread drives non-blocking sockets with a selector (no asyncio tasks or streams), reading only the
status line and Content-Length of each answer.

Usage: python bench/openloop.py PORT RATE SECONDS KEY_FILE MEMBERS_FILE RUN_ID OCCURRED_AT
Prints one line: RESULT created=.. failed=.. answered=.. seconds=.. p50_ms=.. p95_ms=.. p99_ms=.. max_ms=..
connections=.. generator_cpu_ms=.."""

import json
import random
import re
import selectors
import socket
import sys
import time
from collections import deque

MAX_CONNECTIONS = 64
HOST = "127.0.0.1"
GIVE_UP_SECONDS = 300
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def purchase_body(run: str, n: int, member: str, occurred_at: str) -> bytes:
    lines, total = [], 0
    for _ in range(random.randint(1, 3)):
        qty, unit = random.randint(1, 3), random.randint(500, 40000)
        total += qty * unit
        lines.append(
            {
                "sku": f"SKU-{random.randint(1, 5000)}",
                "category": f"cat-{random.randint(1, 40)}",
                "quantity": str(qty),
                "unit_price": f"{unit // 100}.{unit % 100:02d}",
                "amount": f"{qty * unit // 100}.{qty * unit % 100:02d}",
            }
        )
    body = {
        "external_id": f"{run}-{n}",
        "store": f"store-{random.randint(1, 50)}",
        "channel": "pos",
        "member": member,
        "type": "purchase",
        "occurred_at": occurred_at,
        "currency": "SEK",
        "total": f"{total // 100}.{total % 100:02d}",
        "lines": lines,
    }
    return json.dumps(body).encode()


class Connection:
    """A keep-alive connection carrying one request at a time."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.due = 0.0  # scheduled send time of the request in flight
        self.buffer = b""

    def send(self, request: bytes, due: float) -> None:
        self.due, self.buffer = due, b""
        self.sock.sendall(request)  # small requests fit the socket buffer of an idle connection

    def answer(self) -> tuple[int, bytes] | None:
        """The status and body once the whole answer has arrived; None while it has not; raises if the server
        closed the connection."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        length = _CONTENT_LENGTH.search(self.buffer, 0, head_end + 2)
        if length is None:
            raise ConnectionError("an answer without Content-Length")
        body = self.buffer[head_end + 4 :]
        if len(body) < int(length.group(1)):
            return None
        return int(self.buffer[9:12]), body


def run(port: int, requests: list[bytes], rate: int) -> dict:
    selector = selectors.DefaultSelector()
    idle: list[Connection] = []
    waiting: deque[tuple[bytes, float]] = deque()  # due, but every connection busy
    latencies: list[float] = []
    counts = {"created": 0, "failed": 0, "opened": 0}
    start = time.monotonic() + 0.2
    sent = 0

    def dispatch(request: bytes, due: float) -> None:
        if idle:
            conn = idle.pop()
        elif counts["opened"] < MAX_CONNECTIONS:
            conn = Connection(port)
            counts["opened"] += 1
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        else:
            waiting.append((request, due))
            return
        conn.send(request, due)

    while len(latencies) < len(requests):
        now = time.monotonic()
        while sent < len(requests) and start + sent / rate <= now:
            dispatch(requests[sent], start + sent / rate)
            sent += 1
        if now > start + len(requests) / rate + GIVE_UP_SECONDS:
            unanswered = len(requests) - len(latencies)
            raise TimeoutError(f"{unanswered} requests unanswered {GIVE_UP_SECONDS} s after the last was due")
        timeout = max(0.0, start + sent / rate - now) if sent < len(requests) else 1.0
        for key, _ in selector.select(timeout):
            conn: Connection = key.data
            try:
                answer = conn.answer()
            except OSError as exc:  # ConnectionError included: counted, and the run fails its checks
                answer = (0, str(exc).encode())
                selector.unregister(conn.sock)
                conn.sock.close()
                counts["opened"] -= 1
                conn = None
            if answer is None:
                continue
            latencies.append(time.monotonic() - (key.data.due))
            status, body = answer
            if status == 201:
                counts["created"] += 1
            else:
                counts["failed"] += 1
                if counts["failed"] <= 3:
                    print(f"openloop: HTTP {status}: {body[:300]!r}", file=sys.stderr)
            if conn is not None:
                idle.append(conn)
            if waiting:
                dispatch(*waiting.popleft())
    counts["seconds"] = time.monotonic() - start
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    counts["latencies"] = sorted(latencies)
    return counts


def main(port: int, rate: int, seconds: int, key: str, members: list[str], run_id: str, occurred_at: str) -> None:
    requests = []
    for n in range(rate * seconds):
        body = purchase_body(run_id, n, random.choice(members), occurred_at)
        requests.append(
            (
                f"POST /api/v1/transactions HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Api-Key {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
    cpu = time.process_time()
    result = run(port, requests, rate)
    cpu = time.process_time() - cpu
    latencies = result["latencies"]

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000

    print(
        f"RESULT created={result['created']} failed={result['failed']} answered={len(latencies)} "
        f"seconds={result['seconds']:.3f} p50_ms={pct(50):.2f} p95_ms={pct(95):.2f} p99_ms={pct(99):.2f} "
        f"max_ms={latencies[-1] * 1000:.2f} connections={result['opened']} "
        f"generator_cpu_ms={cpu * 1000 / len(latencies):.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    port, rate, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if not (1 <= rate <= 5000 and 1 <= seconds <= 600):
        sys.exit("RATE must be 1-5000 and SECONDS 1-600")
    with open(sys.argv[4]) as f:
        api_key = f.read().strip()
    with open(sys.argv[5]) as f:
        member_numbers = f.read().split()
    main(port, rate, seconds, api_key, member_numbers, sys.argv[6], sys.argv[7])
