"""Benchmark of `import_transactions`: N purchases for about N/10 members, imported into a fresh PostgreSQL
database (loyalty_import_bench), its members created and its tables vacuumed and analysed first, as autovacuum
leaves them a while later, then the ledger verified. Prints one line per figure.

Then the baseline, in the same run: raw PostgreSQL doing the same writes. The rows the import wrote are read back,
the ledger's tables emptied, and the rows written again chunk by chunk as the import writes them (COPY the
transactions, open the new accounts with their balances and lock the others, COPY the entries and the lots, set the
others' balances; one database transaction a chunk, synchronous_commit off), from text made ready beforehand: no
parsing, no points worked out, no Python per row while it runs. The same tables, indexes and constraints. It runs
three times: with the foreign keys checked by PostgreSQL's trigger per row at commit; checked set-based as the
import checks them (core/references.py); and set-based on two connections at once, each chunk's rows split into the
import's two lanes as the import splits them. The ledger is verified again after each, so they wrote what the import
wrote.

The import writes in lanes of members at once (--writers, default IMPORT_WRITERS: 2). The last baseline is then
its ceiling on this machine as it is during the run: PostgreSQL's own work for the same writes on both cores, with
no Python at all; the ratio of the two rates says how much the import's own work costs. The one-connection
baselines are kept for comparison with earlier rounds.

Usage: python bench/import_bench.py [--purchases 200000] [--members 20000] [--batch-size 5000] [--writers N] [--keep]
Needs PostgreSQL at BENCH_PG (default postgres://postgres@127.0.0.1:5432). Amounts and dates come from the CDNOW
sample in ../shared/data/cdnow_sample.txt when it is there (its dates moved forward to end last month, its dollar
amounts read as the programme's currency), else from a seeded random generator."""

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "loyalty_import_bench"
CDNOW = ROOT.parent / "shared" / "data" / "cdnow_sample.txt"

sys.path.insert(0, str(ROOT))
from benchdb import SERVER, database_recreate, members_create  # noqa: E402

os.environ["DATABASE_URL"] = f"{SERVER}/{DATABASE}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


def purchases_source(rng: random.Random) -> list[tuple[date, Decimal]]:
    """(day, amount) pairs: the CDNOW purchases when the sample is there, else random ones."""
    if CDNOW.is_file():
        found = []
        for text in CDNOW.read_text().splitlines():
            parts = text.split()
            if len(parts) == 5 and Decimal(parts[4]) > 0:
                found.append((datetime.strptime(parts[2], "%Y%m%d").date(), Decimal(parts[4])))
        last = max(day for day, _ in found)
        shift = (date.today().replace(day=1) - timedelta(days=1)) - last
        return [(day + shift, amount) for day, amount in found]
    today = date.today()
    return [
        (today - timedelta(days=rng.randrange(1, 720)), Decimal(rng.randrange(100, 50000)) / 100) for _ in range(5000)
    ]


def file_write(path: Path, *, purchases: int, members: list[str], rng: random.Random) -> None:
    from loyalty.imports import FIELDS  # after django.setup()

    source = purchases_source(rng)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(FIELDS)
        for i in range(purchases):
            day, amount = source[i % len(source)]
            at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
                seconds=rng.randrange(8 * 3600, 20 * 3600)
            )
            member = "" if rng.random() < 0.02 else rng.choice(members)  # a few anonymous purchases
            scaled = (amount * 10).quantize(Decimal("0.01"))  # dollars of 1997 as SEK of today, roughly
            out.writerow([f"S{i % 40:02d}", f"T{i:08d}", "pos", member, "purchase", "", at.isoformat(), "SEK", scaled])


def server_cpu_reader(backend_pid: int):
    """CPU seconds of the whole PostgreSQL server that runs backend `backend_pid`, when it runs on this machine (else
    None): every process of its postmaster, and those that have ended (the import's writers close their connections),
    background writers and autovacuum included. The benchmark is all that runs on it."""
    stat = Path(f"/proc/{backend_pid}/stat")
    if not stat.exists():
        return lambda: None
    ticks = os.sysconf("SC_CLK_TCK")
    postmaster = int(stat.read_text().rsplit(")", 1)[1].split()[1])

    def fields(pid) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return None

    def read() -> float | None:
        own = fields(postmaster)
        if own is None:
            return None
        total = int(own[13]) + int(own[14])  # the children it has reaped
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (child := fields(entry.name)) is not None and int(child[1]) == postmaster:
                total += int(child[11]) + int(child[12])
        return total / ticks

    return read


def python_cpu_seconds() -> float:
    """CPU seconds of this process and of the processes it has reaped: those that check parts of the file."""
    spent = os.times()
    return spent.user + spent.system + spent.children_user + spent.children_system


def baseline_prepare(batch_size: int) -> tuple[dict, list[dict]]:
    """The columns of each table, and per chunk of `batch_size` transactions (in id order, as the import wrote
    them) the COPY text of its transactions, entries and lots, its account ids, and each account's balances after
    it, read back from the tables. The bench's file has no returns, so there are no draws to write."""
    import psycopg

    chunks: dict[int, dict] = {}

    def chunk(number: int) -> dict:
        return chunks.setdefault(
            number, {"transactions": [], "entries": [], "lots": [], "accounts": [], "balances": [[], [], []]}
        )

    numbered = f"SELECT id, (row_number() OVER (ORDER BY id) - 1) / {int(batch_size)} AS chunk FROM loyalty_transaction"
    exports = {
        "transactions": f"SELECT c.chunk, t.* FROM loyalty_transaction t JOIN ({numbered}) c USING (id) ORDER BY t.id",
        "entries": f"SELECT c.chunk, e.* FROM loyalty_entry e JOIN ({numbered}) c ON c.id = e.transaction_id "
        "ORDER BY e.id",
        "lots": f"SELECT c.chunk, l.* FROM loyalty_lot l JOIN loyalty_entry e ON e.id = l.entry_id "
        f"JOIN ({numbered}) c ON c.id = e.transaction_id ORDER BY l.entry_id",
    }
    with psycopg.connect(f"{SERVER}/{DATABASE}") as conn:
        draws, other = conn.execute(
            "SELECT (SELECT count(*) FROM loyalty_draw), "
            "(SELECT count(*) FROM loyalty_entry WHERE transaction_id IS NULL)"
        ).fetchone()
        assert draws == 0 and other == 0, "the baseline writes purchases' entries and lots only"
        columns = {}
        for kind, query in exports.items():
            with conn.cursor().copy(f"COPY ({query}) TO STDOUT") as copy:
                text = b"".join(bytes(data) for data in copy).decode()
            for line in text.splitlines(keepends=True):
                number, rest = line.split("\t", 1)
                chunk(int(number))[kind].append(rest)
            columns[kind] = [d.name for d in conn.execute(f"SELECT * FROM ({query}) q LIMIT 0").description][1:]
        balances = conn.execute(
            f"SELECT DISTINCT ON (c.chunk, e.account_id) c.chunk, e.account_id, e.available_after, e.pending_after, "
            "sum(e.points) OVER (PARTITION BY e.account_id ORDER BY e.id) "
            f"FROM loyalty_entry e JOIN ({numbered}) c ON c.id = e.transaction_id "
            "ORDER BY c.chunk, e.account_id, e.id DESC"
        ).fetchall()
    for number, account_id, available, pending, lifetime in balances:
        found = chunk(number)
        found["accounts"].append(account_id)
        for i, value in enumerate((available, pending, lifetime)):
            found["balances"][i].append(value)
    return columns, [chunks[number] for number in sorted(chunks)]


def first_column(lines: list[str]) -> list[int]:
    """The ids that begin COPY text lines."""
    return [int(line.split("\t", 1)[0]) for line in lines]


def lanes_split(columns: dict, chunks: list[dict], lanes: int) -> list[list[dict]]:
    """`chunks` split into `lanes` lanes as the import's lanes split them (service.lane_of: by the member number, or
    the external id of a purchase without a member), each lane holding its part of every
    chunk: a chunk's rows are one lane's, but where two lanes drew their ids at once. Lanes then share no account,
    and each account's rows stay in their chunk and in order."""
    if lanes == 1:
        return [chunks]
    import psycopg

    from loyalty.imports.service import lane_of

    with psycopg.connect(f"{SERVER}/{DATABASE}") as conn:
        numbers = conn.execute("SELECT id, member_number FROM members_member")
        lane_of_member = {pk: lane_of(number, lanes) for pk, number in numbers}
    at = {kind: columns[kind].index("member_id" if kind == "transactions" else "account_id") for kind in columns}
    external_id = columns["transactions"].index("external_id")
    split: list[list[dict]] = [[] for _ in range(lanes)]
    for chunk in chunks:
        parts = [
            {"transactions": [], "entries": [], "lots": [], "accounts": [], "balances": [[], [], []]}
            for _ in range(lanes)
        ]
        for kind, column in at.items():
            for line in chunk[kind]:
                fields = line.split("\t")
                key = fields[column]
                lane = lane_of_member[int(key)] if key != "\\N" else lane_of(fields[external_id], lanes)
                parts[lane][kind].append(line)
        for i, account in enumerate(chunk["accounts"]):
            part = parts[lane_of_member[account]]
            part["accounts"].append(account)
            for values, value in zip(part["balances"], (v[i] for v in chunk["balances"]), strict=True):
                values.append(value)
        for lane, part in enumerate(parts):
            if part["transactions"]:
                split[lane].append(part)
    return split


def baseline_run(columns: dict, chunks: list[dict], *, set_based: bool, lanes: int = 1) -> tuple[float, float | None]:
    """Write the prepared chunks (`baseline_prepare`) into the emptied ledger; (seconds, PostgreSQL CPU seconds or
    None). Foreign keys are checked by PostgreSQL's trigger per row, or `set_based` as the import checks them
    (core/references.py: the triggers skipped, then one query per table). In `lanes` connections at once, each
    writing its accounts' part of every chunk (lanes_split)."""
    import threading

    import psycopg

    from core.db import array_literal
    from core.references import foreign_keys_check, owned_present
    from loyalty.models import Account, Entry, Lot, Transaction

    def write(cursor, chunk: dict, kind: str, table: str) -> None:
        with cursor.copy(f"COPY {table} ({', '.join(columns[kind])}) FROM STDIN") as copy:
            copy.write("".join(chunk[kind]))

    def write_lane(conn, lane_chunks: list[dict]) -> None:
        for chunk in lane_chunks:
            after = dict(zip(chunk["accounts"], zip(*chunk["balances"], strict=True), strict=True))
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
                if set_based:
                    cursor.execute("SET LOCAL session_replication_role = replica")
                write(cursor, chunk, "transactions", "loyalty_transaction")
                # As ledger_credit_rows: the accounts not there yet opened with their balances, the others locked.
                cursor.execute(
                    "SELECT a.member_id FROM unnest(%s::bigint[]) AS v(id) JOIN loyalty_account AS a "
                    "ON a.member_id = v.id",
                    [array_literal(chunk["accounts"])],
                )
                present = {pk for (pk,) in cursor.fetchall()}
                new = sorted(set(after) - present)
                if set_based:  # the import checks new accounts' member keys by PostgreSQL's trigger, at commit
                    cursor.execute("SET LOCAL session_replication_role = origin")
                cursor.execute(
                    "INSERT INTO loyalty_account (member_id, available, pending, lifetime_earned, held, updated_at) "
                    "SELECT v.*, 0, now() FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                    "AS v(member_id, available, pending, lifetime) ORDER BY member_id",
                    [array_literal(new), *(array_literal(after[pk][i] for pk in new) for i in range(3))],
                )
                if set_based:
                    cursor.execute("SET LOCAL session_replication_role = replica")
                present = sorted(present)
                cursor.execute(
                    "SELECT member_id FROM loyalty_account WHERE member_id = ANY(%s::bigint[]) "
                    "ORDER BY member_id FOR UPDATE",
                    [array_literal(present)],
                )
                held = {Account: new + [pk for (pk,) in cursor.fetchall()]}
                write(cursor, chunk, "entries", "loyalty_entry")
                write(cursor, chunk, "lots", "loyalty_lot")
                if set_based:
                    cursor.execute("SET LOCAL session_replication_role = origin")
                    entry_ids, transaction_ids = first_column(chunk["entries"]), first_column(chunk["transactions"])
                    # A lane's part of a chunk may hold only purchases without points: no entries.
                    own = owned_present(
                        cursor, {m: ids for m, ids in ((Transaction, transaction_ids), (Entry, entry_ids)) if ids}
                    )
                    foreign_keys_check(cursor, Transaction, "id", transaction_ids, own)
                    if entry_ids:
                        foreign_keys_check(cursor, Entry, "id", entry_ids, own, held)
                        foreign_keys_check(cursor, Lot, "entry_id", entry_ids, own, held)
                cursor.execute(
                    "UPDATE loyalty_account AS a SET available = v.available, pending = v.pending, "
                    "lifetime_earned = v.lifetime, updated_at = now() "
                    "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                    "AS v(member_id, available, pending, lifetime) WHERE a.member_id = v.member_id",
                    [array_literal(present), *(array_literal(after[pk][i] for pk in present) for i in range(3))],
                )

    split = lanes_split(columns, chunks, lanes)
    with psycopg.connect(f"{SERVER}/{DATABASE}", autocommit=True) as conn:
        ledger = "loyalty_draw, loyalty_lot, loyalty_entry, loyalty_transaction, loyalty_account"
        # Tables that refer to the ledger's go with CASCADE: they must be empty here, or the baseline would lose rows.
        others = conn.execute(
            "WITH RECURSIVE refs(t) AS (SELECT unnest(%s::regclass[]) UNION "
            "SELECT c.conrelid::regclass FROM pg_constraint c JOIN refs ON c.confrelid = refs.t WHERE c.contype = 'f') "
            "SELECT t::text FROM refs WHERE NOT t = ANY(%s::regclass[])",
            ["{" + ledger + "}"] * 2,
        ).fetchall()
        for (table,) in others:
            assert conn.execute(f"SELECT NOT EXISTS (SELECT FROM {table})").fetchone()[0], f"{table} has rows"
        conn.execute(f"TRUNCATE {ledger} CASCADE")
        cpu = server_cpu_reader(conn.info.backend_pid)
        extra = [psycopg.connect(f"{SERVER}/{DATABASE}", autocommit=True) for _ in split[1:]]
        try:
            failed: list[BaseException] = []

            def run(lane_conn, lane_chunks):
                try:
                    write_lane(lane_conn, lane_chunks)
                except BaseException as exc:  # raised below
                    failed.append(exc)

            threads = [
                threading.Thread(target=run, args=(lane_conn, lane_chunks))
                for lane_conn, lane_chunks in zip([conn, *extra], split, strict=True)
            ]
            cpu_before, started = cpu(), time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds, cpu_after = time.perf_counter() - started, cpu()
            if failed:
                raise failed[0]
        finally:
            for lane_conn in extra:
                lane_conn.close()
    return seconds, (cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purchases", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=None, help="import lanes (default IMPORT_WRITERS)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()

    database_recreate(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from core.models import Program
    from loyalty.imports import TransactionFile, transactions_import
    from loyalty.models import Entry, Lot, Transaction
    from loyalty.verify import ledger_verify

    rng = random.Random(1997)
    started = time.perf_counter()
    numbers = members_create(args.members)
    print(f"members created: {len(numbers)} in {time.perf_counter() - started:.2f} s")
    from django.db import connection

    # The tables as autovacuum leaves them in a while (statistics, hint bits, the visibility map): a history is
    # imported for members enrolled before, and the baselines below run after the import, by when it has.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    workdir = Path(tempfile.mkdtemp(prefix="import_bench_"))
    path = workdir / "purchases.csv"
    file_write(path, purchases=args.purchases, members=numbers, rng=rng)
    print(f"file: {path} ({path.stat().st_size / 1e6:.1f} MB, {args.purchases} purchases)")

    program = Program.objects.get(code="DEFAULT")
    connection.ensure_connection()
    backend = server_cpu_reader(connection.connection.info.backend_pid)
    python_before, backend_before = python_cpu_seconds(), backend()
    report = transactions_import(
        program=program, rows=TransactionFile(path), batch_size=args.batch_size, writers=args.writers
    )
    python_cpu, backend_after = python_cpu_seconds() - python_before, backend()
    backend_cpu = backend_after - backend_before if backend_after is not None and backend_before is not None else None
    assert not report.errors, report.errors[:5]
    from django.conf import settings

    writers = settings.IMPORT_WRITERS if args.writers is None else args.writers
    print(f"import: {report.imported} transactions in {report.seconds:.2f} s, {writers} lane(s)")
    print(f"import rate: {report.imported / report.seconds:,.0f} transactions/s")
    # CPU seconds do not count the time spent waiting for a busy machine: a figure that holds under load.
    print(f"python cpu: {python_cpu:.2f} s ({python_cpu / report.imported * 1e6:.1f} us/transaction)")
    if backend_cpu is not None:
        per = backend_cpu / report.imported * 1e6
        print(f"postgres cpu (whole server): {backend_cpu:.2f} s ({per:.1f} us/transaction)")
        # The rate if the machine's cores did nothing but this work and never waited.
        cores = os.cpu_count() or 1
        print(
            f"cpu-bound rate, {cores} cores: {report.imported * cores / (python_cpu + backend_cpu):,.0f} transactions/s"
        )
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"points credited: {report.points_credited}")

    rerun = transactions_import(
        program=program, rows=TransactionFile(path), batch_size=args.batch_size, writers=args.writers
    )
    print(f"rerun: imported {rerun.imported}, already present {rerun.already_present} in {rerun.seconds:.2f} s")

    started = time.perf_counter()
    breaches = ledger_verify()
    print(f"verify: {len(breaches)} breaches in {time.perf_counter() - started:.2f} s")
    rows = Transaction.objects.count(), Entry.objects.count(), Lot.objects.count()
    print(f"rows: {rows[0]} transactions, {rows[1]} entries, {rows[2]} lots")

    prepared = baseline_prepare(args.batch_size)
    replayed = []
    for set_based, lanes, name in (
        (False, 1, "foreign keys per row"),
        (True, 1, "foreign keys set-based, as the import"),
        (True, 2, "foreign keys set-based, two connections at once"),
    ):
        seconds, baseline_cpu = baseline_run(*prepared, set_based=set_based, lanes=lanes)
        rate = rows[0] / seconds
        print(f"baseline, raw PostgreSQL, same writes, {name}: {rows[0]} transactions in {seconds:.2f} s")
        print(f"  rate: {rate:,.0f} transactions/s")
        if baseline_cpu is not None:
            per = baseline_cpu / rows[0] * 1e6
            print(f"  postgres cpu (whole server): {baseline_cpu:.2f} s ({per:.1f} us/transaction)")
        print(f"  import / baseline: {report.imported / report.seconds / rate:.2f}")
        breaches += ledger_verify()
        replayed.append((Transaction.objects.count(), Entry.objects.count(), Lot.objects.count()))
    print(f"verify after the baselines: {len(breaches)} breaches; rows the same: {replayed == [rows] * 3}")
    if not args.keep:
        path.unlink()
        workdir.rmdir()
    if breaches or rerun.imported or replayed != [rows] * 3:
        sys.exit(1)


if __name__ == "__main__":
    main()
