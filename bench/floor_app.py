"""The floor for the earn benchmark: a bare WSGI application that does a purchase's database work, and nothing else.

It takes bench/earn.lua's purchases, finds the member by number (one statement) and writes the transaction, the
account's balances, the entry and the lot in one statement, as the service's one-statement path does; then answers
201 with a small JSON body. No framework, no authentication, no validation, no rules, no idempotency key: what is
left is the web server, the JSON and psycopg, so its rate is about the most any Python service on this machine can
do with these writes. bench/run serves it with the same server and settings as the service (scripts/serve's
granian, WEB_WORKERS x WEB_THREADS) and reports the service's rate against it. Rows keep the ledger's invariants,
so verify_ledger passes; their store is "floor" (bench/run counts them apart).

Environment: DATABASE_URL. Not part of the service: benchmark only."""

import json
import os
import threading
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg

DSN = os.environ["DATABASE_URL"]
PURCHASE = """
WITH r AS (
    INSERT INTO loyalty_transaction (program_id, store, external_id, channel, member_id, kind, original_id,
        occurred_at, currency, total, lines, points, breakdown, returned_total, points_reversed, paid_with_points,
        api_client_id, created_at)
    VALUES (%s, 'floor', %s, 'pos', %s, 'purchase', NULL, %s, 'SEK', %s, %s, %s, %s, 0, 0, 0, NULL, now())
    ON CONFLICT DO NOTHING RETURNING id),
a AS (
    UPDATE loyalty_account SET available = available + %s, lifetime_earned = lifetime_earned + %s, updated_at = now()
    WHERE member_id = %s AND EXISTS (SELECT FROM r) RETURNING available, pending, held),
e AS (
    INSERT INTO loyalty_entry (account_id, kind, points, available_after, pending_after, held_after, occurred_at,
        created_at, transaction_id, reason)
    SELECT %s, 'earn', %s, a.available, a.pending, a.held, %s, now(), r.id, '' FROM r, a
    RETURNING id, available_after, pending_after),
l AS (
    INSERT INTO loyalty_lot (account_id, entry_id, amount, remaining, available_from, expires_at, matured)
    SELECT %s, e.id, %s, %s, %s, %s, true FROM e RETURNING entry_id)
SELECT r.id, e.available_after, e.pending_after FROM r, e, l"""
_local = threading.local()


def _connection() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(DSN, autocommit=True)
        _local.program = conn.execute("SELECT id FROM core_program WHERE code = 'DEFAULT'").fetchone()[0]
    return conn


def application(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] != "/api/v1/transactions":
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
    conn = _connection()
    program = _local.program
    member = conn.execute(
        "SELECT id FROM members_member WHERE member_number = %s AND program_id = %s", [body["member"], program]
    ).fetchone()[0]
    total = Decimal(body["total"])
    points, at = int(total), datetime.fromisoformat(body["occurred_at"])
    breakdown = json.dumps([{"rule": "base", "points": points}])
    row = conn.execute(
        PURCHASE,
        [program, body["external_id"], member, at, total, json.dumps(body["lines"]), points, breakdown]
        + [points, points, member]
        + [member, points, at]
        + [member, points, points, at, at + timedelta(days=730)],
    ).fetchone()
    answer = json.dumps(
        {"id": row[0], "points": {"earned": points}, "balance": {"available": row[1], "pending": row[2]}}
    ).encode()
    start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]
