"""The ledger's batch jobs: pending lots mature, lots past their expiry expire."""

from datetime import datetime

from django.db import transaction

from core.db import batch_statements
from loyalty.models import Account, Draw, Entry, Lot


def _due_accounts(lots_due) -> list[int]:
    """Lock, in primary-key order, the accounts of a bounded batch of due lots; returns their ids."""
    account_ids = sorted(set(lots_due.values_list("account_id", flat=True)))
    return list(
        Account.objects.select_for_update().filter(pk__in=account_ids).order_by("pk").values_list("pk", flat=True)
    )


@batch_statements()
def ledger_mature_due(*, now: datetime, batch_size: int = 1000) -> int:
    """Make pending lots whose time has come available; settles negative balances from them. Returns how many
    lots matured. Works in batches of `batch_size` lots, each its own transaction; safe to run twice or
    concurrently, because each batch re-reads its lots after locking their accounts."""
    done = 0
    while True:
        with transaction.atomic():
            due = Lot.objects.filter(matured=False, available_from__lte=now)
            account_ids = _due_accounts(due.order_by("available_from")[:batch_size])
            if not account_ids:
                return done
            lots = list(due.filter(account_id__in=account_ids).order_by("account_id", "available_from", "pk"))
            accounts = {a.pk: a for a in Account.objects.filter(pk__in=account_ids)}
            draws = []
            for lot in lots:
                account = accounts[lot.account_id]
                settle = min(lot.remaining, max(0, -account.available))
                account.pending -= lot.remaining
                account.available += lot.remaining
                if settle:
                    lot.remaining -= settle
                    draws.append(Draw(entry_id=lot.entry_id, lot=lot, points=settle))
                lot.matured = True
            Lot.objects.bulk_update(lots, ["matured", "remaining"])
            Draw.objects.bulk_create(draws)
            for account in accounts.values():
                account.updated_at = now
            Account.objects.bulk_update(accounts.values(), ["available", "pending", "updated_at"])
            done += len(lots)


@batch_statements()
def ledger_expire_due(*, now: datetime, batch_size: int = 1000) -> int:
    """Expire what is left of lots whose expiry has passed, one expire entry per lot. Returns how many lots
    expired. Batched and safe to run twice or concurrently, like ledger_mature_due."""
    done = 0
    while True:
        with transaction.atomic():
            due = Lot.objects.filter(expires_at__lte=now, remaining__gt=0)
            account_ids = _due_accounts(due.order_by("expires_at")[:batch_size])
            if not account_ids:
                return done
            lots = list(due.filter(account_id__in=account_ids).order_by("account_id", "expires_at", "pk"))
            lots_expire(lots, now=now)
            done += len(lots)


def lots_expire(lots: list[Lot], *, now: datetime) -> None:
    """Expire what is left of `lots`, past their expiry and not empty, in their accounts' order: one expire entry
    per lot, with its draw, and the accounts' balances. The caller holds the accounts' locks. Also ledger_credit's,
    for points whose expiry passed before they arrived."""
    accounts = {a.pk: a for a in Account.objects.filter(pk__in={lot.account_id for lot in lots})}
    entries = []
    for lot in lots:
        account = accounts[lot.account_id]
        if lot.matured:
            account.available -= lot.remaining
        else:
            account.pending -= lot.remaining
        entries.append(
            Entry(
                account_id=account.pk,
                kind=Entry.Kind.EXPIRE,
                points=-lot.remaining,
                available_after=account.available,
                pending_after=account.pending,
                held_after=account.held,
                occurred_at=lot.expires_at,
                created_at=now,
            )
        )
    Entry.objects.bulk_create(entries)
    Draw.objects.bulk_create(
        Draw(entry=entry, lot=lot, points=lot.remaining) for entry, lot in zip(entries, lots, strict=True)
    )
    for lot in lots:
        lot.remaining = 0
    Lot.objects.bulk_update(lots, ["remaining"])
    for account in accounts.values():
        account.updated_at = now
    Account.objects.bulk_update(accounts.values(), ["available", "pending", "updated_at"])
