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

Lock order. Every path takes the rows it locks in this global order, and where it takes several of one kind, in
primary-key order; a path may skip steps but never goes back to an earlier one (tests/test_lock_order.py):
  1. a single row claimed by compare-and-set (a hold, a voucher), or a new purchase's unique (store, external_id)
     (an import chunk's purchases: in (store, external_id) order);
  2. purchase rows a return locks (FOR UPDATE; an import chunk's returns: all of them first, in key order);
  3. accounts: ledger_lock or any ledger write; two or more strictly in key order, every one not there yet opened
     (inserted) before any is locked (referrals rewarded or undone, the jobs and imports, through ledger_lock_many,
     ledger_credit_many and ledger_credit_rows): opening an account waits for the transaction that opened it
     first, so a path that opened one after locking another could deadlock with it (tests/test_lock_order.py);
  4. shared counters: earning rules' budget slices (key order; a purchase's one statement locks one slice a
     budget, the careful claim all of them), then a reward's stock; a member's rule usage rows are written only
     under that member's account lock (after 3; in a purchase's one statement, right after it);
  5. the member's tier status row (locked before the count, so the review job, which skips locked rows, never
     decides on a window missing uncommitted activity), then their tier counter row.
Unique keys inserted later (a return's own row, an event's external_id) can only make a path wait for a repeat of
the same key, whose holder waits for nothing this path holds. Member and programme rows are only key-share locked,
by inserts that reference them (foreign-key checks: at commit, or where an import chunk checks them set-based, at
the end of its purchases' COPY, core.references); member services lock a member for update but never
wait for a row above while they do; programme services (tiers, settings) lock the programme FOR NO KEY UPDATE,
which key-share locks do not wait for, and may then wait for status rows.
"""

from loyalty.ledger.bulk import BulkCredit, credit_refs, ledger_credit_many, ledger_credit_rows, ledger_lock_many
from loyalty.ledger.core import (
    EARNED_KINDS,
    Balance,
    ledger_credit,
    ledger_credit_new_transaction,
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
    "BulkCredit",
    "credit_refs",
    "ledger_balance",
    "ledger_capture",
    "ledger_credit",
    "ledger_credit_new_transaction",
    "ledger_credit_many",
    "ledger_credit_rows",
    "ledger_debit",
    "ledger_expire_due",
    "ledger_hold",
    "ledger_lock",
    "ledger_lock_many",
    "ledger_mature_due",
    "ledger_refund",
    "ledger_reverse",
    "ledger_spend",
    "ledger_unhold",
]
