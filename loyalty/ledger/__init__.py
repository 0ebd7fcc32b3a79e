"""The points ledger: the only code that writes Account, Entry, Lot and Draw rows.

Rules every function here keeps:
- Entries are append-only; a correction is a new entry.
- A member's account row is locked before anything of theirs is written, so their writes are serialised; jobs that
  touch many accounts lock them in primary-key order, so they cannot deadlock with each other or with a purchase.
- The cached balances change in the same database transaction as the entries that explain them:
    available + pending == sum(entry.points)
    pending == sum(lot.remaining) over pending lots
    max(available, 0) == sum(lot.remaining) over matured lots (available is negative only after a reversal of
    points already spent, and then every matured lot is empty)
    lot.remaining == lot.amount - sum(draw.points)
  `loyalty.verify` checks them all.
"""

from loyalty.ledger.bulk import ledger_credit_many
from loyalty.ledger.core import (
    EARNED_KINDS,
    Balance,
    HeldBalance,
    ledger_credit,
    ledger_debit,
    ledger_lock,
    ledger_reverse,
)
from loyalty.ledger.holds import (
    ledger_balance,
    ledger_capture,
    ledger_hold,
    ledger_refund,
    ledger_spend,
    ledger_unhold,
)
from loyalty.ledger.jobs import ledger_expire_due, ledger_mature_due

__all__ = [
    "EARNED_KINDS",
    "Balance",
    "HeldBalance",
    "ledger_balance",
    "ledger_capture",
    "ledger_credit",
    "ledger_credit_many",
    "ledger_debit",
    "ledger_expire_due",
    "ledger_hold",
    "ledger_lock",
    "ledger_mature_due",
    "ledger_refund",
    "ledger_reverse",
    "ledger_spend",
    "ledger_unhold",
]
