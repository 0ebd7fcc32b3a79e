"""Checks every ledger invariant with set-based queries; `manage.py verify_ledger` reports what it finds."""

from contextlib import nullcontext
from dataclasses import dataclass

from django.db import connection, transaction

from loyalty.models import Account, BudgetSlice, Draw, EarningRule, Entry, Lot, Transaction


@dataclass(frozen=True)
class Breach:
    check: str
    subject: str
    detail: str


def _t(model) -> str:
    return model._meta.db_table


def _checks() -> list[tuple[str, str]]:
    a, e, lot, d, t = _t(Account), _t(Entry), _t(Lot), _t(Draw), _t(Transaction)
    return [
        (
            "balance equals the sum of entries",
            f"""SELECT a.member_id, a.available + a.pending, COALESCE(s.total, 0) FROM {a} a
                LEFT JOIN (SELECT account_id, SUM(points) AS total FROM {e} GROUP BY account_id) s
                  ON s.account_id = a.member_id
                WHERE a.available + a.pending <> COALESCE(s.total, 0)""",
        ),
        (
            "pending equals what pending lots hold",
            f"""SELECT a.member_id, a.pending, COALESCE(s.total, 0) FROM {a} a
                LEFT JOIN (SELECT account_id, SUM(remaining) AS total FROM {lot} WHERE NOT matured
                           GROUP BY account_id) s ON s.account_id = a.member_id
                WHERE a.pending <> COALESCE(s.total, 0)""",
        ),
        (
            "available equals what matured lots hold",
            f"""SELECT a.member_id, a.available, COALESCE(s.total, 0) FROM {a} a
                LEFT JOIN (SELECT account_id, SUM(remaining) AS total FROM {lot} WHERE matured
                           GROUP BY account_id) s ON s.account_id = a.member_id
                WHERE CASE WHEN a.available > 0 THEN a.available ELSE 0 END <> COALESCE(s.total, 0)""",
        ),
        (
            "lifetime earned equals earnings and bonuses less reversals plus positive adjustments",
            f"""SELECT a.member_id, a.lifetime_earned, COALESCE(s.total, 0) FROM {a} a
                LEFT JOIN (SELECT account_id, SUM(points) AS total FROM {e}
                           WHERE kind IN ('earn', 'reversal', 'bonus') OR (kind = 'adjust' AND points > 0)
                           GROUP BY account_id) s ON s.account_id = a.member_id
                WHERE a.lifetime_earned <> COALESCE(s.total, 0)""",
        ),
        (
            "a lot's remaining equals its amount less its draws",
            f"""SELECT l.entry_id, l.remaining, l.amount - COALESCE(s.total, 0) FROM {lot} l
                LEFT JOIN (SELECT lot_id, SUM(points) AS total FROM {d} GROUP BY lot_id) s ON s.lot_id = l.entry_id
                WHERE l.remaining <> l.amount - COALESCE(s.total, 0)""",
        ),
        (
            "no lot below zero or above its amount",
            f"SELECT entry_id, remaining, amount FROM {lot} WHERE remaining < 0 OR remaining > amount",
        ),
        (
            "a lot credits exactly its entry's points to the entry's account",
            f"""SELECT l.entry_id, l.amount, e.points FROM {lot} l JOIN {e} e ON e.id = l.entry_id
                WHERE l.amount <> e.points OR l.account_id <> e.account_id""",
        ),
        (
            "a spend or expiry takes from lots exactly what it removed",
            f"""SELECT e.id, -e.points, COALESCE(SUM(dr.points), 0) FROM {e} e
                LEFT JOIN {d} dr ON dr.entry_id = e.id
                WHERE e.kind IN ('redeem', 'expire') OR (e.kind = 'adjust' AND e.points < 0)
                GROUP BY e.id, e.points HAVING -e.points <> COALESCE(SUM(dr.points), 0)""",
        ),
        (
            "a purchase's earn entry carries the points the purchase recorded",
            f"""SELECT t.id, t.points, e.points FROM {t} t JOIN {e} e ON e.transaction_id = t.id
                WHERE e.kind = 'earn' AND e.points <> t.points""",
        ),
        (
            "a member's purchase that earned points has exactly one earn entry",
            f"""SELECT t.id, COALESCE(s.n, 0), 1 FROM {t} t
                LEFT JOIN (SELECT transaction_id, COUNT(*) AS n FROM {e}
                           WHERE kind = 'earn' AND transaction_id IS NOT NULL
                           GROUP BY transaction_id) s ON s.transaction_id = t.id
                WHERE t.kind = 'purchase' AND t.member_id IS NOT NULL AND t.points > 0
                      AND COALESCE(s.n, 0) <> 1""",
        ),
        (
            "an entry of a transaction is on its member's account",
            f"""SELECT e.id, e.account_id, t.member_id FROM {e} e JOIN {t} t ON t.id = e.transaction_id
                WHERE t.member_id IS DISTINCT FROM e.account_id""",
        ),
        (
            # A return records what it should take back (negative); its reversal takes all of it (allow_negative),
            # or what was there to take, possibly nothing and then without an entry (available_only). The policy
            # may have changed since, so only the bounds are checked.
            "a return's entries take back at most the points it recorded",
            f"""SELECT t.id, SUM(e.points), t.points || ' to 0' FROM {t} t JOIN {e} e ON e.transaction_id = t.id
                WHERE t.kind = 'return'
                GROUP BY t.id, t.points HAVING SUM(e.points) < t.points OR SUM(e.points) > 0""",
        ),
        (
            "a purchase's returns never reverse more than it earned",
            f"""SELECT t.id, t.points, t.points_reversed FROM {t} t
                WHERE t.kind = 'purchase' AND (t.points_reversed > t.points OR t.points_reversed < 0
                      OR t.points_reversed <> COALESCE(
                          (SELECT -SUM(r.points) FROM {t} r WHERE r.original_id = t.id), 0))""",
        ),
        (
            "a refund gives back exactly what its spend took, to the same account",
            f"""SELECT r.id, r.points, -s.points FROM {e} r JOIN {e} s ON s.id = r.refund_of_id
                WHERE r.points <> -s.points OR r.account_id <> s.account_id""",
        ),
        (
            # Each slice is held within its size by a CHECK; this is what makes that hold the budget.
            "a budget's slices add up to the budget",
            f"""SELECT r.id, r.budget, SUM(b.size) FROM {_t(EarningRule)} r JOIN {_t(BudgetSlice)} b ON b.rule_id = r.id
                WHERE r.budget IS NOT NULL GROUP BY r.id, r.budget HAVING SUM(b.size) <> r.budget
                UNION ALL
                SELECT r.id, r.budget, 0 FROM {_t(EarningRule)} r WHERE r.budget IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM {_t(BudgetSlice)} b WHERE b.rule_id = r.id)""",
        ),
    ]


def ledger_verify(*, limit: int = 20) -> list[Breach]:
    """Every breach of a ledger invariant, at most `limit` per check."""
    breaches = []
    postgresql = connection.vendor == "postgresql"
    # On PostgreSQL in a transaction of its own (a savepoint in a caller's), for its planner setting; on SQLite,
    # whose transactions here take the database's write lock, without one.
    with transaction.atomic() if postgresql else nullcontext(), connection.cursor() as cursor:
        if postgresql:
            # Every check reads whole tables, which hash joins do best. Statistics a freshly loaded table has not had
            # yet can make the planner expect a few rows and join them in nested loops: 67 s for one check of 47,280
            # purchases in a benchmark run, against 0.1 s. The setting is the transaction's and is given back below:
            # a caller's transaction would keep it after this block, and a failed check rolls it back.
            cursor.execute("SELECT current_setting('enable_nestloop'), set_config('enable_nestloop', 'off', true)")
            setting = cursor.fetchone()[0]
        for name, sql in _checks():
            cursor.execute(f"{sql} LIMIT {int(limit)}")
            for subject, found, expected in cursor.fetchall():
                breaches.append(Breach(name, str(subject), f"found {found}, expected {expected}"))
        if postgresql:
            cursor.execute("SELECT set_config('enable_nestloop', %s, true)", [setting])
    return breaches
