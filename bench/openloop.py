"""Open-loop, fixed-rate load: POST /api/v1/transactions at RATE requests/s for SECONDS, to 127.0.0.1 only.

Each request has a scheduled send time (start + i / RATE) and its latency is counted from that time, not from when
a connection became free, so a stalled server shows up in the percentiles instead of slowing the generator down
(no coordinated omission). Requests are sent on keep-alive connections; a new one is opened when all are busy, up to
MAX_CONNECTIONS. The run is bounded: exactly RATE * SECONDS requests, and it gives up 300 s after the last is sent.

Usage: python bench/openloop.py PORT RATE SECONDS KEY_FILE MEMBERS_FILE RUN_ID OCCURRED_AT
Prints one line: RESULT created=.. failed=.. answered=.. seconds=.. p50_ms=.. p95_ms=.. p99_ms=.. max_ms=.."""

import asyncio
import json
import random
import sys
import time

MAX_CONNECTIONS = 64
HOST = "127.0.0.1"


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


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise RuntimeError("response without Content-Length")
    return status, await reader.readexactly(length)


class Pool:
    def __init__(self, port: int):
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.freed = asyncio.Condition()

    async def acquire(self):
        async with self.freed:
            while not self.idle and self.open >= MAX_CONNECTIONS:
                await self.freed.wait()
            if self.idle:
                return self.idle.pop()
            self.open += 1
        return await asyncio.open_connection(HOST, self.port)

    async def release(self, conn, *, reusable: bool):
        async with self.freed:
            if reusable:
                self.idle.append(conn)
            else:
                self.open -= 1
                conn[1].close()
            self.freed.notify()


async def send(pool: Pool, request: bytes) -> tuple[int, bytes]:
    for attempt in range(2):
        conn = await pool.acquire()
        ok = False
        try:
            conn[1].write(request)
            status, body = await read_response(conn[0])
            ok = True
            return status, body
        except asyncio.IncompleteReadError as exc:
            # The server closed an idle keep-alive connection before reading the request: nothing was done, so
            # sending it again on a fresh connection cannot record it twice.
            if exc.partial or attempt:
                return 0, f"connection closed mid-response: {exc}".encode()
        except (OSError, RuntimeError) as exc:
            return 0, str(exc).encode()
        finally:
            await pool.release(conn, reusable=ok)
    raise AssertionError("unreachable")


async def one(pool: Pool, request: bytes, due: float, latencies: list, counts: dict) -> None:
    status, body = await send(pool, request)
    latencies.append(time.monotonic() - due)
    if status == 201:
        counts["created"] += 1
    else:
        counts["failed"] += 1
        if counts["failed"] <= 3:
            print(f"openloop: HTTP {status}: {body[:300]!r}", file=sys.stderr)


async def main(port: int, rate: int, seconds: int, key: str, members: list[str], run: str, occurred_at: str):
    pool = Pool(port)
    total = rate * seconds
    latencies: list[float] = []
    counts = {"created": 0, "failed": 0}
    tasks = []
    start = time.monotonic() + 0.2
    for n in range(total):
        body = purchase_body(run, n, random.choice(members), occurred_at)
        request = (
            f"POST /api/v1/transactions HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Api-Key {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(pool, request, due, latencies, counts)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    elapsed = time.monotonic() - start
    for reader_writer in pool.idle:
        reader_writer[1].close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000

    print(
        f"RESULT created={counts['created']} failed={counts['failed']} answered={len(latencies)} "
        f"seconds={elapsed:.3f} p50_ms={pct(50):.2f} p95_ms={pct(95):.2f} p99_ms={pct(99):.2f} "
        f"max_ms={latencies[-1] * 1000:.2f} connections={pool.open}"
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
    asyncio.run(main(port, rate, seconds, api_key, member_numbers, sys.argv[6], sys.argv[7]))
