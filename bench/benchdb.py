"""What the Python benchmarks share: a database of their own on the benchmark's PostgreSQL, and members inserted
set-based."""

import os

SERVER = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")


def database_recreate(name: str) -> None:
    """Drop the database `name` if it is there, and create it empty."""
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


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
