"""Seed the benchmark database: members of the DEFAULT programme and one all-scopes API client.

Usage: DATABASE_URL=... python bench/seed.py OUT_DIR MEMBERS
Writes OUT_DIR/key (the raw API key), OUT_DIR/members (one member number a line) and OUT_DIR/member_ids (their
primary keys, for the raw-SQL baseline). Members are bulk-inserted, not
enrolled one by one through the API: enrolment is not what is being measured, and 10,000 of them take a second."""

import os
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from core.models import ApiClient, Program  # noqa: E402
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


def main(out_dir: Path, count: int) -> None:
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
    rules = int(os.environ.get("BENCH_RULES", "0"))
    for n in range(rules):
        earning_rule_create(program=program, **_rule(n))
    (out_dir / "key").write_text(raw_key)
    (out_dir / "members").write_text("".join(f"{m.member_number}\n" for m in members))
    (out_dir / "member_ids").write_text("".join(f"{m.pk}\n" for m in members))
    print(f"seeded {len(members)} members and API client {client.key_prefix}…")


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        sys.exit("usage: seed.py OUT_DIR MEMBERS")
    main(Path(sys.argv[1]), int(sys.argv[2]))
