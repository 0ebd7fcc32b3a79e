"""The service's own CPU per request as a count of machine instructions: a figure that a noisy machine does not
move, for comparing two versions of the code (docs/benchmarks.md). Requests per second on this machine's shared
cores vary by a third from hour to hour; the instructions the Python process executes for a purchase vary by about
one percent.

Usage: python bench/instructions.py [--requests 300] [--rules 0]
Creates the database loyalty_bench_instructions (dropped first), seeds it as bench/run does (bench/seed.py: 10,000
members, BENCH_RULES = --rules active earning rules), then runs this file's client under valgrind (cachegrind, no
cache simulation) twice: once with a warm-up only, once with the warm-up and --requests purchases; again for
balance reads, and for the same purchases sent to bench/floor_app.py (bench/run's floor), for scale. The
difference divided by the count is the instructions per request, client side only: the WSGI application called
in-process (config.wsgi, DEBUG off), as granian calls it, with the database's own work excluded. Needs valgrind
(installed with apt-get if missing) and PostgreSQL at BENCH_PG."""

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "loyalty_bench_instructions"
SERVER = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
WARM_UP = 100


def client(seed_dir: Path, kind: str, count: int) -> None:
    """Call the WSGI application `WARM_UP` + `count` times with requests like bench/earn.lua's and balance.lua's;
    for kind "floor", bench/floor_app.py with the purchases."""
    sys.path.insert(0, str(ROOT))
    if kind == "floor":
        sys.path.insert(0, str(ROOT / "bench"))
        from floor_app import application
    else:
        from config.wsgi import application

    key = (seed_dir / "key").read_text().strip()
    members = (seed_dir / "members").read_text().split()
    rng = random.Random(7)  # the same requests in every run
    run = os.urandom(4).hex()

    def purchase(n: int) -> tuple[str, str, bytes]:
        lines, total = [], 0
        for _ in range(rng.randint(1, 3)):
            quantity, unit = rng.randint(1, 3), rng.randint(500, 40000)
            amount = quantity * unit
            total += amount
            lines.append(
                {
                    "sku": f"SKU-{rng.randint(1, 5000)}",
                    "category": f"cat-{rng.randint(1, 40)}",
                    "quantity": str(quantity),
                    "unit_price": f"{unit // 100}.{unit % 100:02d}",
                    "amount": f"{amount // 100}.{amount % 100:02d}",
                }
            )
        body = {
            "external_id": f"{run}-{n}",
            "store": f"store-{rng.randint(1, 50)}",
            "channel": "pos",
            "member": rng.choice(members),
            "type": "purchase",
            "occurred_at": "2026-11-20T10:00:00Z",
            "currency": "SEK",
            "total": f"{total // 100}.{total % 100:02d}",
            "lines": lines,
        }
        return "POST", "/api/v1/transactions", json.dumps(body).encode()

    def balance(n: int) -> tuple[str, str, bytes]:
        return "GET", f"/api/v1/members/{rng.choice(members)}/balance", b""

    make = balance if kind == "balance" else purchase
    for n in range(WARM_UP + count):
        method, path, body = make(n)
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8765",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "127.0.0.1:8765",
            "HTTP_AUTHORIZATION": f"Api-Key {key}",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
        }
        if body:
            environ.update(CONTENT_TYPE="application/json", CONTENT_LENGTH=str(len(body)))
        status: list[str] = []
        b"".join(application(environ, lambda s, h, status=status: status.append(s)))
        if not status[0].startswith(("200", "201")):
            sys.exit(f"{method} {path}: {status[0]}")


def instructions(seed_dir: Path, kind: str, count: int) -> int:
    """Instructions the client process executes, start to end, for `count` requests after the warm-up."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--client",
            str(seed_dir),
            kind,
            str(count),
        ],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        sys.exit(f"valgrind printed no instruction count:\n{out.stderr[-2000:]}")
    return int(found[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rules", type=int, default=0)
    args = parser.parse_args()
    if not 10 <= args.requests <= 10_000 or not 0 <= args.rules <= 100:
        sys.exit("--requests must be 10-10,000 and --rules 0-100")
    if shutil.which("valgrind") is None:
        print("== installing valgrind", flush=True)
        subprocess.run(
            "apt-get install -y -qq valgrind >/dev/null 2>&1 || "
            "(apt-get update -qq && apt-get install -y -qq valgrind >/dev/null)",
            shell=True,
            check=True,
        )
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    python = [sys.executable]
    subprocess.run([*python, str(ROOT / "manage.py"), "migrate", "-v0"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        seed_dir = Path(tmp)
        env = {**os.environ, "BENCH_RULES": str(args.rules)}
        subprocess.run([*python, str(ROOT / "bench" / "seed.py"), tmp, "10000"], check=True, env=env)
        for kind in ("earn", "balance", "floor"):
            base = instructions(seed_dir, kind, 0)
            total = instructions(seed_dir, kind, args.requests)
            per = (total - base) / args.requests
            print(f"{kind}: {per:,.0f} instructions per request ({args.requests} requests, {args.rules} rules)")


if __name__ == "__main__":
    os.environ["DATABASE_URL"] = f"{SERVER}/{DATABASE}"
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    if sys.argv[1:2] == ["--client"]:
        client(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
