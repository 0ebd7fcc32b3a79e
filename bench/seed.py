"""Seed the benchmark database: members of the DEFAULT programme and one all-scopes API client.

Usage: DATABASE_URL=... python bench/seed.py OUT_DIR MEMBERS
Writes OUT_DIR/key (the raw API key), OUT_DIR/members (one member number a line) and OUT_DIR/member_ids (their
primary keys, for the raw-SQL baseline). Members are bulk-inserted, not
enrolled one by one through the API: enrolment is not what is being measured, and 10,000 of them take a second.
Environment: BENCH_RULES active earning rules (0); BENCH_HISTORY purchases a member of imported history (0), after
which the tables are analysed (see _history_import)."""

import os
import random
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from core.models import ApiClient, Program  # noqa: E402
from loyalty.imports import transactions_import  # noqa: E402
from loyalty.models import Account  # noqa: E402
from loyalty.rule_services import earning_rule_create  # noqa: E402
from members.models import Member  # noqa: E402
from members.numbers import new_member_number  # noqa: E402


def _rule(n: int) -> dict:
    """Active earning rules of every kind, most of which a bench purchase meets (issue 3: the earn path with 20
    active rules). One in four carries a per-member limit, one in five a budget, so claims run too."""
    kinds = [
        {"categories": [f"cat-{n % 5}"], "benefit": "multiplier", "value": Decimal(2)},
        {"skus": [f"SKU-{n % 7}"], "benefit": "per_unit", "value": Decimal(3)},
        {"min_basket": Decimal("50.00"), "benefit": "fixed", "value": Decimal(5)},
        {"channels": ["pos"], "days_of_week": [1, 2, 3, 4, 5, 6, 7], "benefit": "fixed", "value": Decimal(1)},
        {"stores": [f"store-{n % 3}"], "benefit": "multiplier", "value": Decimal("1.5")},
    ]
    limits = {"member_limit": 10_000} if n % 4 == 0 else {}
    budget = {"budget": 10**12} if n % 5 == 0 else {}
    return {"code": f"bench-{n}", "name": f"Bench rule {n}", "priority": n, **kinds[n % len(kinds)], **limits, **budget}


def _count(name: str, most: int) -> int:
    value = os.environ.get(name, "0")
    if not value.isdigit() or int(value) > most:
        sys.exit(f"{name} must be a whole number from 0 to {most}, not {value!r}")
    return int(value)


def _history_import(program: Program, numbers: list[str], per_member: int, now) -> None:
    """`per_member` purchases a member over the past year, imported as a retailer loads its history, then the
    tables analysed as autovacuum would have by then: the bench then measures a programme in service, whose tables
    are large and have statistics (where autovacuum is off, as on a test server, they would have none). Tables the
    history leaves empty (rule usage: imports apply no rules) stay unanalysed, so PostgreSQL goes on estimating them
    from their size as they grow, as autovacuum's next analysis would let it; analysed empty, their plans would be
    made for empty tables and kept."""
    rng = random.Random(11)
    rows = [
        (
            line,
            {
                "store": f"store-{rng.randint(1, 50)}",
                "external_id": f"history-{line}",
                "channel": "pos",
                "member": numbers[line % len(numbers)],
                "type": "purchase",
                "original_external_id": "",
                "occurred_at": (now - timedelta(seconds=rng.randrange(3600, 365 * 86400))).isoformat(),
                "currency": program.currency,
                "total": f"{rng.randint(20, 2000)}.{rng.randint(0, 99):02d}",
            },
        )
        for line in range(len(numbers) * per_member)
    ]
    report = transactions_import(program=program, rows=rows)
    if report.imported != len(rows):
        sys.exit(f"history import: {report.imported} of {len(rows)} imported")
    analysed = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT EXISTS (SELECT FROM {connection.ops.quote_name(table)})")
            if cursor.fetchone()[0]:
                cursor.execute(f"ANALYZE {connection.ops.quote_name(table)}")
                analysed.append(table)
    print(f"imported {len(rows)} purchases of history and analysed the {len(analysed)} tables that hold rows")


def main(out_dir: Path, count: int) -> None:
    rules, history = _count("BENCH_RULES", 100), _count("BENCH_HISTORY", 100)
    program = Program.objects.get(code="DEFAULT")
    now = timezone.now()
    numbers: set[str] = set()
    while len(numbers) < count:
        numbers.add(new_member_number())
    extra = [{} for _ in numbers]
    if any(f.name == "referral_code" for f in Member._meta.concrete_fields):
        # Unique per programme and given at enrolment; bulk inserts must hand them out themselves.
        from members.referral_codes import new_referral_code

        codes: set[str] = set()
        while len(codes) < count:
            codes.add(new_referral_code())
        extra = [{"referral_code": code} for code in codes]
    with transaction.atomic():
        client = ApiClient(program=program, name="bench-till", scopes=list(ApiClient.Scope.values))
        raw_key = client.set_new_key()
        client.save()
        members = Member.objects.bulk_create(
            [
                Member(program=program, member_number=n, email=f"bench{i}@example.com", enrolled_at=now, **more)
                for i, (n, more) in enumerate(zip(sorted(numbers), extra, strict=True))
            ],
            batch_size=2000,
        )
        # Accounts are opened on first use; opening them here keeps the first purchase of each member ordinary.
        Account.objects.bulk_create([Account(member=m) for m in members], batch_size=2000)
    for n in range(rules):
        earning_rule_create(program=program, **_rule(n))
    if history:
        _history_import(program, [m.member_number for m in members], history, now)
    (out_dir / "key").write_text(raw_key)
    (out_dir / "members").write_text("".join(f"{m.member_number}\n" for m in members))
    (out_dir / "member_ids").write_text("".join(f"{m.pk}\n" for m in members))
    print(f"seeded {len(members)} members and API client {client.key_prefix}…")


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        sys.exit("usage: seed.py OUT_DIR MEMBERS")
    main(Path(sys.argv[1]), int(sys.argv[2]))
