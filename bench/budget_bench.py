"""Benchmark of budget claims on the careful path: purchases that are not by member number (a card, an email, a
phone: the caller has read the member) meeting earning rules with budgets, from many threads at once, through the
service layer (loyalty.transactions.transaction_record; no HTTP). Into a fresh PostgreSQL database
(loyalty_budget_bench). Prints one line per figure.

Two modes, alternated in the same run so their ratio means something on a noisy machine:
- "own slice first" (the code as it is): each purchase locks and charges only its member's slice of each budget,
  and locks every slice only when that one runs short;
- "every slice" (rule_claims._claim_from_own_slices switched off): each purchase locks all sixteen slices of each budget
  it meets, as every purchase not by member number did before the eighth round.
Then the budgets are spent (each cut to what it has given), and two more modes alternate: "passed over" (the code
as it is: a purchase that found a budget spent marks it, and the purchases after it pass its rule over) and "looked
up every time" (rules._budget_spent switched off: each purchase locks every slice to find the budget spent).
Afterwards: verify_ledger, and each budget's use equal to the points its rule gave.

Usage: python bench/budget_bench.py [--threads 8] [--purchases 3000] [--members 2000] [--rounds 2]
Needs PostgreSQL at BENCH_PG (default postgres://postgres@127.0.0.1:5432)."""

import argparse
import os
import random
import sys
import threading
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "loyalty_budget_bench"

sys.path.insert(0, str(ROOT))
from benchdb import SERVER, database_recreate, members_create  # noqa: E402

os.environ["DATABASE_URL"] = f"{SERVER}/{DATABASE}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


def setup(members: int):
    from core.models import Program
    from loyalty.rule_services import earning_rule_create
    from members.models import Member

    program = Program.objects.get(code="DEFAULT")
    for n in range(4):  # four budgeted promotions, as bench/seed.py's 20 rules hold, with budgets never spent here
        earning_rule_create(
            program=program, code=f"promo-{n}", name=f"Promo {n}", benefit="fixed", value=Decimal(5), budget=10**12
        )
    members_create(members)
    return program, list(Member.objects.filter(program=program))


def shop(program, members, *, threads: int, purchases: int, tag: str) -> float:
    """`purchases` purchases from `threads` threads; the seconds it took."""
    from django.db import connection
    from django.utils import timezone

    from loyalty.transactions import TransactionInput, transaction_record

    at = timezone.now() - timedelta(minutes=5)
    barrier, errors = threading.Barrier(threads + 1), []

    def work(number: int):
        rng = random.Random(number)
        try:
            barrier.wait()
            for n in range(purchases // threads):
                transaction_record(
                    program=program,
                    data=TransactionInput(
                        store="S1",
                        external_id=f"{tag}-{number}-{n}",
                        channel="pos",
                        kind="purchase",
                        occurred_at=at,
                        currency="SEK",
                        total=Decimal("129.90"),
                        member=rng.choice(members),
                    ),
                )
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    assert not errors, errors[:3]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--purchases", type=int, default=3000)
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    database_recreate(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from loyalty import rule_claims, rules
    from loyalty.models import Transaction
    from loyalty.rule_models import BudgetSlice, EarningRule
    from loyalty.verify import ledger_verify

    program, members = setup(args.members)
    own_slice_first = rule_claims._claim_from_own_slices
    shop(program, members, threads=args.threads, purchases=args.threads * 50, tag="warmup")
    results: dict[str, list[float]] = {"own slice first": [], "every slice": []}
    for round_ in range(args.rounds):
        for mode in results:
            rule_claims._claim_from_own_slices = own_slice_first if mode == "own slice first" else (lambda *a: None)
            seconds = shop(program, members, threads=args.threads, purchases=args.purchases, tag=f"{mode}-{round_}")
            rate = args.purchases // args.threads * args.threads / seconds
            results[mode].append(rate)
            print(f"{mode}, round {round_ + 1}: {rate:,.0f} purchases/s ({args.threads} threads)")
    rule_claims._claim_from_own_slices = own_slice_first
    from loyalty.rule_services import earning_rule_update

    for rule in EarningRule.objects.filter(budget__isnull=False):
        earning_rule_update(rule=rule, budget=sum(BudgetSlice.objects.filter(rule=rule).values_list("used", flat=True)))
    budget_spent = rules._budget_spent
    results.update({"spent, passed over": [], "spent, looked up every time": []})
    for round_ in range(args.rounds):
        for mode in ("spent, passed over", "spent, looked up every time"):
            rules._budget_spent = budget_spent if mode == "spent, passed over" else (lambda rule: False)
            seconds = shop(program, members, threads=args.threads, purchases=args.purchases, tag=f"{mode}-{round_}")
            rate = args.purchases // args.threads * args.threads / seconds
            results[mode].append(rate)
            print(f"{mode}, round {round_ + 1}: {rate:,.0f} purchases/s ({args.threads} threads)")
    rules._budget_spent = budget_spent
    for mode, rates in results.items():
        print(f"{mode}: best {max(rates):,.0f} purchases/s")
    print(f"own slice first / every slice: {max(results['own slice first']) / max(results['every slice']):.2f}")
    print(
        "spent: passed over / looked up every time: "
        f"{max(results['spent, passed over']) / max(results['spent, looked up every time']):.2f}"
    )

    breaches = ledger_verify()
    print(f"verify: {len(breaches)} breaches")
    given = {}
    for breakdown in Transaction.objects.values_list("breakdown", flat=True):
        for line in breakdown:
            given[line["rule"]] = given.get(line["rule"], 0) + line["points"]
    for rule in EarningRule.objects.order_by("code"):
        used = sum(BudgetSlice.objects.filter(rule=rule).values_list("used", flat=True))
        assert used == given.get(rule.code, 0), (rule.code, used, given.get(rule.code))
    print(f"budgets: each one's use equals the points its rule gave ({len(given) - 1} rules)")
    assert not breaches, breaches[:5]


if __name__ == "__main__":
    main()
