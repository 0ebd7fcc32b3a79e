"""`manage.py verify_ledger`: checks every ledger invariant; exits non-zero with a report when one is broken."""

from itertools import groupby

from django.core.management.base import BaseCommand, CommandError

from loyalty.models import Account, Entry, Lot
from loyalty.verify import ledger_verify


class Command(BaseCommand):
    help = "Check the points ledger: cached balances, lots, draws and returns against the entries that explain them."

    def add_arguments(self, parser):
        parser.add_argument(
            "--limit",
            type=int,
            default=20,
            help="Report at most this many breaches per check (default 20).",
        )

    def handle(self, *args, limit: int, **options):
        if limit < 1:
            raise CommandError("--limit must be at least 1.")
        breaches = ledger_verify(limit=limit)
        if not breaches:
            self.stdout.write(
                self.style.SUCCESS(
                    f"ledger ok: {Account.objects.count()} accounts, {Entry.objects.count()} entries, "
                    f"{Lot.objects.count()} lots checked"
                )
            )
            return
        # ledger_verify returns breaches check by check, so grouping keeps its order.
        for check, group in groupby(breaches, key=lambda b: b.check):
            group = list(group)
            self.stdout.write(self.style.ERROR(f"{check}: {len(group)} breach(es)"))
            for breach in group:
                self.stdout.write(f"  subject {breach.subject}: {breach.detail}")
        checks = len({b.check for b in breaches})
        raise CommandError(f"ledger broken: {len(breaches)} breach(es) of {checks} check(s); see the report above.")
