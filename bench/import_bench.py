"""Benchmark of `import_transactions`: N purchases for about N/10 members, imported into a fresh PostgreSQL
database (loyalty_import_bench), then the ledger verified. Prints one line per figure.

Usage: python bench/import_bench.py [--purchases 200000] [--members 20000] [--batch-size 5000] [--keep]
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
SERVER = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
CDNOW = ROOT.parent / "shared" / "data" / "cdnow_sample.txt"

sys.path.insert(0, str(ROOT))
os.environ["DATABASE_URL"] = f"{SERVER}/{DATABASE}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


def database_recreate() -> None:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")


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


def members_create(count: int) -> list[str]:
    """Members inserted set-based: enrolment one by one is not what is measured here."""
    from django.utils import timezone

    from core.models import Program
    from members.models import Member
    from members.numbers import new_member_number
    from members.referral_codes import new_referral_code

    program = Program.objects.get(code="DEFAULT")
    numbers: set[str] = set()
    while len(numbers) < count:
        numbers.add(new_member_number())
    codes: set[str] = set()
    while len(codes) < count:
        codes.add(new_referral_code())
    now = timezone.now()
    Member.objects.bulk_create(
        [
            Member(program=program, member_number=n, referral_code=code, email=f"bench{i}@example.com", enrolled_at=now)
            for i, (n, code) in enumerate(zip(sorted(numbers), sorted(codes), strict=True))
        ],
        batch_size=5000,
    )
    return sorted(numbers)


def file_write(path: Path, *, purchases: int, members: list[str], rng: random.Random) -> None:
    source = purchases_source(rng)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "store",
                "external_id",
                "channel",
                "member",
                "type",
                "original_external_id",
                "occurred_at",
                "currency",
                "total",
            ]
        )
        for i in range(purchases):
            day, amount = source[i % len(source)]
            at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
                seconds=rng.randrange(8 * 3600, 20 * 3600)
            )
            member = "" if rng.random() < 0.02 else rng.choice(members)  # a few anonymous purchases
            scaled = (amount * 10).quantize(Decimal("0.01"))  # dollars of 1997 as SEK of today, roughly
            out.writerow([f"S{i % 40:02d}", f"T{i:08d}", "pos", member, "purchase", "", at.isoformat(), "SEK", scaled])


def backend_cpu_reader():
    """CPU seconds of this connection's PostgreSQL backend, when the server runs on this machine (else None)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        stat = Path(f"/proc/{cursor.fetchone()[0]}/stat")

    def read() -> float | None:
        if not stat.exists():
            return None
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purchases", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()

    database_recreate()
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
    workdir = Path(tempfile.mkdtemp(prefix="import_bench_"))
    path = workdir / "purchases.csv"
    file_write(path, purchases=args.purchases, members=numbers, rng=rng)
    print(f"file: {path} ({path.stat().st_size / 1e6:.1f} MB, {args.purchases} purchases)")

    program = Program.objects.get(code="DEFAULT")
    backend = backend_cpu_reader()
    python_before, backend_before = time.process_time(), backend()
    report = transactions_import(program=program, rows=TransactionFile(path), batch_size=args.batch_size)
    python_cpu, backend_after = time.process_time() - python_before, backend()
    backend_cpu = backend_after - backend_before if backend_after is not None and backend_before is not None else None
    assert not report.errors, report.errors[:5]
    print(f"import: {report.imported} transactions in {report.seconds:.2f} s")
    print(f"import rate: {report.imported / report.seconds:,.0f} transactions/s")
    # CPU seconds do not count the time spent waiting for a busy machine: a figure that holds under load.
    print(f"python cpu: {python_cpu:.2f} s ({python_cpu / report.imported * 1e6:.1f} us/transaction)")
    if backend_cpu is not None:
        print(f"postgres cpu: {backend_cpu:.2f} s ({backend_cpu / report.imported * 1e6:.1f} us/transaction)")
        print(f"cpu-bound rate: {report.imported / (python_cpu + backend_cpu):,.0f} transactions/s")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"points credited: {report.points_credited}")

    rerun = transactions_import(program=program, rows=TransactionFile(path), batch_size=args.batch_size)
    print(f"rerun: imported {rerun.imported}, already present {rerun.already_present} in {rerun.seconds:.2f} s")

    started = time.perf_counter()
    breaches = ledger_verify()
    print(f"verify: {len(breaches)} breaches in {time.perf_counter() - started:.2f} s")
    print(
        f"rows: {Transaction.objects.count()} transactions, {Entry.objects.count()} entries, {Lot.objects.count()} lots"
    )
    if not args.keep:
        path.unlink()
        workdir.rmdir()
    if breaches or rerun.imported:
        sys.exit(1)


if __name__ == "__main__":
    main()
