"""Baseline for the earn benchmark: the writes of one purchase as raw SQL through psycopg, no web stack.

Per purchase, in one database transaction, what the service does: insert the transaction, update the account
(RETURNING the balances), insert the ledger entry, insert the lot. CONNECTIONS clients run concurrently (split over
two processes so the GIL does not cap them), each on its own connection, sending COUNT purchases in all; rows are
real and keep the ledger's invariants, so verify_ledger still passes after it. Store "baseline" tells them apart.

Usage: python bench/baseline.py DSN CONNECTIONS COUNT MEMBER_IDS_FILE RUN_ID OCCURRED_AT
Prints: RESULT created=.. failed=.. answered=.. seconds=.. p50_ms=.. p95_ms=.. p99_ms=.."""

import json
import multiprocessing
import random
import sys
import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg

INSERT_TRANSACTION = """
INSERT INTO loyalty_transaction (program_id, store, external_id, channel, member_id, kind, original_id, occurred_at,
    currency, total, lines, points, breakdown, returned_total, points_reversed, api_client_id, created_at)
VALUES (%s, 'baseline', %s, 'pos', %s, 'purchase', NULL, %s, 'SEK', %s, %s, %s, %s, 0, 0, NULL, %s)
ON CONFLICT DO NOTHING RETURNING id"""
UPDATE_ACCOUNT = """
UPDATE loyalty_account SET available = available + %s, lifetime_earned = lifetime_earned + %s, updated_at = %s
WHERE member_id = %s RETURNING available, pending"""
INSERT_ENTRY = """
INSERT INTO loyalty_entry (account_id, kind, points, available_after, pending_after, occurred_at, created_at,
    transaction_id, reason, staff_user_id, api_client_id)
VALUES (%s, 'earn', %s, %s, %s, %s, %s, %s, '', NULL, NULL) RETURNING id"""
INSERT_LOT = """
INSERT INTO loyalty_lot (account_id, entry_id, amount, remaining, available_from, expires_at, matured)
VALUES (%s, %s, %s, %s, %s, %s, true)"""


def purchase(cur, program_id: int, member_id: int, external_id: str, occurred_at: datetime) -> None:
    lines, total = [], Decimal(0)
    for _ in range(random.randint(1, 3)):
        qty, unit = random.randint(1, 3), Decimal(random.randint(500, 40000)) / 100
        total += qty * unit
        line = {"sku": "SKU-1", "category": "c", "quantity": str(qty), "unit_price": str(unit)}
        lines.append({**line, "amount": str(qty * unit)})
    points = int(total)
    now = datetime.now(occurred_at.tzinfo)
    breakdown = json.dumps([{"rule": "base", "points": points}])
    params = (program_id, external_id, member_id, occurred_at, total, json.dumps(lines), points, breakdown, now)
    cur.execute(INSERT_TRANSACTION, params)
    txn_id = cur.fetchone()[0]
    cur.execute(UPDATE_ACCOUNT, (points, points, now, member_id))
    available, pending = cur.fetchone()
    cur.execute(INSERT_ENTRY, (member_id, points, available, pending, occurred_at, now, txn_id))
    entry_id = cur.fetchone()[0]
    expires = occurred_at + timedelta(days=730)
    cur.execute(INSERT_LOT, (member_id, entry_id, points, points, occurred_at, expires))


def client(dsn, program_id, member_ids, run, tid, count, occurred_at, latencies, errors):
    with psycopg.connect(dsn) as conn:
        for n in range(count):
            started = time.perf_counter()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    purchase(cur, program_id, random.choice(member_ids), f"{run}-{tid}-{n}", occurred_at)
            except psycopg.Error as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter() - started)


def process(dsn, program_id, member_ids, run, first_tid, counts, occurred_at, queue):
    latencies, errors = [], []
    threads = [
        threading.Thread(
            target=client,
            args=(dsn, program_id, member_ids, run, first_tid + i, c, occurred_at, latencies, errors),
        )
        for i, c in enumerate(counts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((latencies, errors))


def main(dsn: str, connections: int, count: int, member_ids: list[int], run: str, occurred_at: datetime):
    with psycopg.connect(dsn) as conn:
        program_id = conn.execute("SELECT id FROM core_program WHERE code = 'DEFAULT'").fetchone()[0]
    per_client = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    groups = [per_client[0::2], per_client[1::2]] if connections > 1 else [per_client]
    queue = multiprocessing.Queue()
    started = time.perf_counter()
    procs = [
        multiprocessing.Process(
            target=process, args=(dsn, program_id, member_ids, run, g * 1000, counts, occurred_at, queue)
        )
        for g, counts in enumerate(groups)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(lat for lats, _ in results for lat in lats)
    errors = [e for _, errs in results for e in errs]
    for e in errors[:3]:
        print(f"baseline: {e}", file=sys.stderr)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000 if latencies else 0.0

    print(
        f"RESULT created={len(latencies)} failed={len(errors)} answered={len(latencies) + len(errors)} "
        f"seconds={elapsed:.3f} p50_ms={pct(50):.2f} p95_ms={pct(95):.2f} p99_ms={pct(99):.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    dsn, connections, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if not (1 <= connections <= 256 and 1 <= count <= 1_000_000):
        sys.exit("CONNECTIONS must be 1-256 and COUNT 1-1000000")
    with open(sys.argv[4]) as f:
        ids = [int(x) for x in f.read().split()]
    main(dsn, connections, count, ids, sys.argv[5], datetime.fromisoformat(sys.argv[6]))
