"""Seed the benchmark database: members of the DEFAULT programme and one all-scopes API client.

Usage: DATABASE_URL=... python bench/seed.py OUT_DIR MEMBERS
Writes OUT_DIR/key (the raw API key), OUT_DIR/members (one member number a line) and OUT_DIR/member_ids (their
primary keys, for the raw-SQL baseline). Members are bulk-inserted, not
enrolled one by one through the API: enrolment is not what is being measured, and 10,000 of them take a second."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from core.models import ApiClient, Program  # noqa: E402
from loyalty.models import Account  # noqa: E402
from members.models import Member  # noqa: E402
from members.numbers import new_member_number  # noqa: E402


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
    (out_dir / "key").write_text(raw_key)
    (out_dir / "members").write_text("".join(f"{m.member_number}\n" for m in members))
    (out_dir / "member_ids").write_text("".join(f"{m.pk}\n" for m in members))
    print(f"seeded {len(members)} members and API client {client.key_prefix}…")


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        sys.exit("usage: seed.py OUT_DIR MEMBERS")
    main(Path(sys.argv[1]), int(sys.argv[2]))
