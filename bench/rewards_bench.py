"""Benchmark: redemptions and paying with points (hold, then capture or release) with 32 concurrent clients on 10
members, over HTTP against the production server (scripts/serve); afterwards it checks that nothing was overdrawn
and that the ledger verifies.

Run (on a migrated PostgreSQL database that may hold other data; it adds its own programme-wide API client, members
and reward):
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/loyalty_bench .venv/bin/python bench/rewards_bench.py \
        [--seconds 20] [--warmup 5] [--clients 32] [--members 10] [--url http://127.0.0.1:8000]
Without --url it starts scripts/serve itself on a free local port and stops it afterwards. Exit status 1 if a check
fails.
"""

import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db.models import Sum  # noqa: E402

from core.models import ApiClient, Program  # noqa: E402
from loyalty.models import Account, Entry  # noqa: E402
from loyalty.points import points_adjust  # noqa: E402
from loyalty.verify import ledger_verify  # noqa: E402
from members.services import member_enroll  # noqa: E402
from rewards.models import Hold, Redemption  # noqa: E402
from rewards.services.catalogue import reward_create  # noqa: E402

START_POINTS = 20_000  # small enough that members run dry during a run, so refusals are exercised too
COST = 10


def seed(members: int) -> tuple[str, list[str], str]:
    program = Program.objects.get(code="DEFAULT")
    run = f"{int(time.time())}-{random.randrange(10**6)}"
    client = ApiClient(program=program, name=f"rewards-bench-{run}", scopes=list(ApiClient.Scope.values))
    key = client.set_new_key()
    client.save()
    numbers = []
    for i in range(members):
        member = member_enroll(program=program, email=f"rb-{run}-{i}@example.com", source="bench")
        points_adjust(member=member, points=START_POINTS, reason="bench seed")
        numbers.append(member.member_number)
    reward = reward_create(
        program=program,
        code=f"bench-{run}"[:40].replace(".", "-"),
        kind="product",
        points_cost=COST,
        name_en="Bench coffee",
    )
    return key, numbers, reward.code


class _Http:
    """A minimal HTTP/1.1 keep-alive client. The load generator shares the machine with the server, so it should
    cost little: http.client's header parsing alone cost ~0.4 ms of CPU per request here."""

    def __init__(self, url: str, key: str):
        parsed = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = (
            f"Host: {parsed.hostname}:{parsed.port}\r\nAuthorization: Api-Key {key}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        self.pending = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(
            b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path.encode(), self.headers, len(body), body)
        )
        while b"\r\n\r\n" not in self.pending:
            self.pending += self._recv()
        head, _, rest = self.pending.partition(b"\r\n\r\n")
        length = int(_CONTENT_LENGTH.search(head).group(1))
        while len(rest) < length:
            rest += self._recv()
        self.pending = rest[length:]
        return int(head[9:12]), rest[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def client_loop(url, key, numbers, reward, deadline, counts: Counter, latencies: list, lock):
    conn = _Http(url, key)
    local, lat = Counter(), []
    rng = random.Random()

    def post(path, body=None):
        started = time.perf_counter()
        status, data = conn.post(path, json.dumps(body).encode() if body else b"")
        lat.append(time.perf_counter() - started)
        return status, data

    n = 0
    while time.monotonic() < deadline:
        n += 1
        member = rng.choice(numbers)
        if rng.random() < 0.5:
            status, _ = post("/api/v1/redemptions", {"member": member, "reward": reward})
            local[f"redeem {status}"] += 1
        else:
            status, data = post("/api/v1/points/holds", {"member": member, "points": rng.randint(5, 30), "store": "B"})
            local[f"hold {status}"] += 1
            if status == 201:
                hold_id = json.loads(data)["hold_id"]
                if rng.random() < 0.5:
                    status, _ = post(f"/api/v1/points/holds/{hold_id}/capture", {"external_id": f"{hold_id}-{n}"})
                    local[f"capture {status}"] += 1
                else:
                    status, _ = post(f"/api/v1/points/holds/{hold_id}/release")
                    local[f"release {status}"] += 1
    conn.sock.close()
    with lock:
        counts.update(local)
        latencies.extend(lat)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 30) -> None:
    parsed = urllib.parse.urlparse(url)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"server at {url} did not come up")


def _cpu_seconds(pids) -> float:
    """CPU time (user + system) the processes have used so far; processes gone or unreadable count as none."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(server) -> list[int]:
    """The server's main process and its workers (the server this script started; none for --url)."""
    if server is None:
        return []
    try:
        with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
            return [server.pid, *map(int, f.read().split())]
    except OSError:
        return [server.pid]


def database_pids() -> list[int]:
    """The PostgreSQL backends serving this database, when it runs on this machine (else their CPU reads as 0)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [pid for (pid,) in cursor.fetchall()]


def check(numbers: list[str], counts: Counter) -> list[str]:
    failures = []
    accounts = Account.objects.filter(member__member_number__in=numbers)
    if accounts.filter(available__lt=0).exists() or accounts.filter(held__lt=0).exists():
        failures.append("an account was overdrawn")
    if accounts.filter(held__gt=0).exists() or Hold.objects.filter(member__member_number__in=numbers, status="open"):
        failures.append("points are still held though every hold was captured or released")
    spent = -(Entry.objects.filter(account__in=accounts, points__lt=0).aggregate(s=Sum("points"))["s"] or 0)
    left = accounts.aggregate(s=Sum("available"))["s"]
    if spent + left != START_POINTS * len(numbers):
        failures.append(f"points do not add up: {spent} spent + {left} left")
    redeemed = Redemption.objects.filter(member__member_number__in=numbers).count()
    if redeemed != counts["redeem 201"]:
        failures.append(f"{redeemed} redemptions stored, {counts['redeem 201']} answered 201")
    captured = Hold.objects.filter(member__member_number__in=numbers, status="captured").count()
    if captured != counts["capture 200"]:
        failures.append(f"{captured} holds captured, {counts['capture 200']} answered 200")
    unexpected = {k: v for k, v in counts.items() if k.split()[1] not in ("200", "201", "409")}
    if unexpected:
        failures.append(f"unexpected answers: {unexpected}")
    if breaches := ledger_verify():
        failures.append(f"ledger breaches: {breaches[:3]}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()

    key, numbers, reward = seed(args.members)
    server = None
    port = free_port()
    url = args.url or f"http://127.0.0.1:{port}"
    if args.url is None:
        env = {**os.environ, "WEB_HOST": "127.0.0.1", "WEB_PORT": str(port), "WEB_LOG_LEVEL": "warning"}
        server = subprocess.Popen([str(ROOT / "scripts/serve")], cwd=ROOT, env=env)
    try:
        wait_for(url)
        # Warm-up, not reported: every server worker imports and connects on its first requests.
        warm, warm_lat, lock = Counter(), [], threading.Lock()
        warm_deadline = time.monotonic() + args.warmup
        warmers = [
            threading.Thread(target=client_loop, args=(url, key, numbers, reward, warm_deadline, warm, warm_lat, lock))
            for _ in range(args.clients)
        ]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        counts, latencies = Counter(), []
        # CPU per request of the server and the database backends, where they can be read (same machine).
        measured = server_pids(server), database_pids()
        cpu_before = [_cpu_seconds(pids) for pids in measured]
        own_before = time.process_time()
        deadline = time.monotonic() + args.seconds
        started = time.perf_counter()
        threads = [
            threading.Thread(target=client_loop, args=(url, key, numbers, reward, deadline, counts, latencies, lock))
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        cpu = [_cpu_seconds(pids) - before for pids, before in zip(measured, cpu_before, strict=True)]
        cpu.append(time.process_time() - own_before)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    total = sum(counts.values())
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(
        f"{total} requests in {elapsed:.1f}s with {args.clients} clients on {args.members} members: "
        f"{total / elapsed:.0f}/s, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    if total:
        print(
            f"CPU per request: server {cpu[0] / total * 1000:.2f} ms, database {cpu[1] / total * 1000:.2f} ms, "
            f"load generator (this process) {cpu[2] / total * 1000:.2f} ms"
        )
    for key_, value in sorted(counts.items()):
        print(f"  {key_}: {value}")
    failures = check(numbers, counts + warm)
    print("checks:", "zero overdrafts, every hold closed, points add up, ledger verified" if not failures else failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
