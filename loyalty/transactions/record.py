"""Recording a purchase or a return (transaction_record), and the purchase's own path: its points and rules, in one
statement where it can, in steps where it must (limits, budgets, a first-purchase bonus, a referral, tiers)."""

from datetime import datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from core.db import on_postgresql, prepared_statements_kept
from core.errors import ApplicationError, MemberNotActive, Unprocessable
from core.models import ApiClient, Program
from loyalty import ledger, referrals, rule_claims, rules, tiers
from loyalty.earning import earning_for_purchase
from loyalty.models import Entry, Transaction
from loyalty.tier_selectors import tier_current_for
from loyalty.transactions.common import (
    CLOCK_SKEW,
    MAX_POINTS,
    TransactionInput,
    TransactionResult,
    insert_ignoring_conflict,
    new_transaction,
    points_out_of_range,
    replay,
    result_of,
)
from loyalty.transactions.returns import record_return
from members.models import Member


def transaction_record(
    *, program: Program, data: TransactionInput, api_client: ApiClient | None = None, now: datetime | None = None
) -> TransactionResult:
    """Record a purchase or return and move its points. Idempotent on (store, external_id): a repeat returns the
    first result with created=False and moves nothing; concurrent repeats are serialised by the unique index."""
    now = now or timezone.now()
    try:
        _validate(program, data, now)
    except ApplicationError as exc:
        # A transaction sent again gets its first result, whatever changed since (its member suspended, the
        # programme's maximum age shortened): the checks are for new transactions. Looked up only on this rare path.
        try:
            return replay(program, data)
        except Transaction.DoesNotExist:
            raise exc from None
    if data.kind == Transaction.Kind.PURCHASE:
        return _record_purchase(program, data, api_client, now)
    return record_return(program, data, api_client, now)


def transaction_preview(*, program: Program, data: TransactionInput, now: datetime | None = None) -> TransactionResult:
    """What transaction_record would do with the same input; writes nothing. It runs the very same code in a
    transaction that is always rolled back, so the preview cannot drift from what a real purchase earns."""
    with prepared_statements_kept(), transaction.atomic():
        result = transaction_record(program=program, data=data, now=now)
        transaction.set_rollback(True)
    return result


def _validate(program: Program, data: TransactionInput, now: datetime) -> None:
    if data.currency != program.currency:
        raise Unprocessable(
            f"This programme takes {program.currency}, not {data.currency}.",
            code="currency_mismatch",
            errors={"currency": [f"Must be {program.currency}."]},
        )
    if data.paid_with_points and (data.kind != Transaction.Kind.PURCHASE or data.paid_with_points > data.total):
        raise Unprocessable(
            "paid_with_points is the part of a purchase's total paid with points.",
            code="invalid_points_payment",
            errors={"paid_with_points": [f"At most the total {data.total}, and only on purchases."]},
        )
    if data.lines:
        lines_total = sum((Decimal(line["amount"]) for line in data.lines), Decimal(0))
        if lines_total != data.total:
            raise Unprocessable(
                f"The lines add up to {lines_total}, not to the total {data.total}.",
                code="lines_do_not_add_up",
                errors={"lines": [f"The amounts add up to {lines_total}, not {data.total}."]},
            )
    if data.occurred_at > now + CLOCK_SKEW:
        raise Unprocessable(
            "occurred_at lies in the future.", code="occurred_in_future", errors={"occurred_at": ["In the future."]}
        )
    max_age = program.max_transaction_age_days
    if max_age is not None and data.occurred_at < now - timedelta(days=max_age):
        raise Unprocessable(
            f"This programme accepts transactions at most {max_age} days old.",
            code="transaction_too_old",
            errors={"occurred_at": [f"More than {max_age} days ago."]},
        )
    if data.member is not None and data.kind == Transaction.Kind.PURCHASE and data.member.status != "active":
        raise MemberNotActive(f"Member {data.member.member_number} is {data.member.status}.")


def transaction_record_by_number(
    *,
    program: Program,
    data: TransactionInput,
    member_number: str,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> TransactionResult | None:
    """transaction_record for a purchase by the member with `member_number`, in the one statement of the common
    purchase, which finds the member too: it saves reading the member first (a round trip and a fifth of a
    purchase's CPU). Possible where earning needs nothing of the member: a programme without tiers, no active rule on
    birthdays, first purchases or tiers; and the member active, with no referral pending. Per-member limits and
    budgets are claimed in the same statement, each whole or not at all (rule_claims.awards_claim_at_once); a claim that
    falls short undoes the whole statement. None, having written nothing, when the purchase is not
    such a one or the statement wrote nothing or fell short of a claim (an unknown member, a repeat, no account yet,
    a limit nearly reached, bad input): the caller then reads the member and calls transaction_record, which
    records it or explains why not, in its own order of checks."""
    now = now or timezone.now()
    active = rules.rules_active(program)
    if (
        data.kind != Transaction.Kind.PURCHASE
        or data.member is not None
        or rules.rules_need(active) - {"limits", "budgets"}  # claims are weighed once the rules have run
        or not _one_statement_possible(program)
    ):
        return None
    try:
        _validate(program, data, now)
    except ApplicationError:
        return None
    txn, awards, credit = _purchase(program, data, api_client, now, active, member_read=False)
    awards = rules.awards_stacked(awards)  # claimed whole or not at all: one cut sends the purchase the careful way
    claims = rule_claims.awards_need_claim(awards)
    if not txn.points or (claims and not rule_claims.awards_claim_possible_at_once(awards)):
        return None
    members = Member._meta.db_table
    where = "member_number = %s AND program_id = %s AND status = %s"
    params = [member_number, program.pk, Member.Status.ACTIVE]
    if program.referrals_enabled:
        where += " AND referred_by_id IS NULL"
    also = None
    if claims:
        claim = rule_claims.awards_claim_at_once(
            awards=awards, program=program, occurred_at=data.occurred_at, member_table=members
        )
        if claim.guard:
            where, params = f"{where} AND {claim.guard}", params + claim.guard_params
        also = claim.also
    # None also where a claim fell short, having written nothing: the careful way cuts it.
    entry = ledger.ledger_credit_new_transaction(
        txn=txn, points=txn.points, member=(f"SELECT id FROM {members} WHERE {where}", params), also=also, **credit
    )
    if entry is None:
        return None
    return result_of(
        txn, created=True, entry=entry, member_number=member_number, available_from=credit["available_from"]
    )


def _record_purchase(program, data, api_client, now) -> TransactionResult:
    member = data.member
    txn, awards, credit = _purchase(program, data, api_client, now, rules.rules_active(program))
    if (
        txn.points
        and _one_statement_possible(program)
        and not rule_claims.awards_need_claim(awards)
        and not _first_purchase_awards(awards)
        and not (member.referred_by_id and program.referrals_enabled)
    ):
        entry = ledger.ledger_credit_new_transaction(txn=txn, points=txn.points, member=member.pk, **credit)
        if entry is not None:
            return result_of(txn, created=True, entry=entry, available_from=credit["available_from"])
    credit["member_id"] = member.pk if member else None
    return _record_purchase_in_steps(program, data, txn, awards, credit, now)


def _first_purchase_awards(awards: list) -> list:
    return [a for a in awards if a.rule is not None and a.rule.first_purchase]


def _one_statement_possible(program: Program) -> bool:
    """Whether one statement can write the programme's purchases (ledger_credit_new_transaction): on PostgreSQL, in
    a programme without tiers. Points to credit, claims and a member's pending referral are the callers' to weigh."""
    return on_postgresql() and not program.has_tiers


def _purchase(
    program, data, api_client, now, active: list, *, member_read: bool = True
) -> tuple[Transaction, list, dict]:
    """The unsaved purchase with its points, the awards the `active` rules may give it (earning_evaluate's: the
    transaction has those rules.awards_stacked keeps), and its credit as the ledger takes it (but for the member).
    `member_read` is False for a member not read yet (transaction_record_by_number), who earns as a member of whom
    no rule asks anything."""
    earning = earning_for_purchase(program=program, total=data.total, occurred_at=data.occurred_at)
    # Anonymous purchases are kept for analytics and earn nothing.
    earns = data.member is not None or not member_read
    awards = rules.earning_evaluate(basket=_basket(program, data, active), active=active) if earns else []
    stacked = rules.awards_stacked(awards)
    points = _points_checked(sum(a.points for a in stacked))
    txn = new_transaction(
        program, data, api_client, now, member=data.member, points=points, breakdown=[a.as_line() for a in stacked]
    )
    credit = {
        "kind": Entry.Kind.EARN,
        "occurred_at": data.occurred_at,
        "available_from": earning.available_from,
        "expires_at": earning.expires_at,
        "now": now,
        "api_client": api_client,
    }
    return txn, awards, credit


def _points_checked(points: int) -> int:
    """`points`, or Unprocessable when one transaction cannot hold them."""
    if points > MAX_POINTS:
        raise Unprocessable(
            points_out_of_range(points),
            code="points_out_of_range",
            errors={"total": ["Too large to earn points on."]},
        )
    return points


@transaction.atomic
def _record_purchase_in_steps(program, data, txn, awards, credit: dict, now) -> TransactionResult:
    member, points = data.member, txn.points
    txn.pk = insert_ignoring_conflict(txn)
    if txn.pk is None:
        return replay(program, data)
    # Before any account lock of this purchase: it locks the referrer's and this member's accounts in key order.
    referrals.referral_on_purchase(program=program, member=member, transaction=txn, now=now)
    first, claims = _first_purchase_awards(awards), rule_claims.awards_need_claim(awards)
    if first or claims:
        # A first-purchase bonus, limits and budgets are weighed only for a purchase that is new, under the member's
        # account lock, which serialises the member's purchases: of two first purchases at once, the second to
        # take it sees the first, and only one earns the bonus.
        ledger.ledger_lock(member.pk)
        granted = awards
        if (
            first
            and Transaction.objects.filter(member=member, kind=Transaction.Kind.PURCHASE).exclude(pk=txn.pk).exists()
        ):
            granted = [a for a in awards if a not in first]
        # Stacked after the cuts, so that an exclusive rule cut to nothing leaves the rules below it their points.
        granted = rule_claims.awards_claim(
            awards=granted, member_id=member.pk, program=program, occurred_at=data.occurred_at
        )
        breakdown = [a.as_line() for a in granted]
        if breakdown != txn.breakdown:
            # The rules below an exclusive one cut to nothing may earn more than it did.
            txn.points, txn.breakdown = _points_checked(sum(a.points for a in granted)), breakdown
            Transaction.objects.filter(pk=txn.pk).update(points=txn.points, breakdown=txn.breakdown)
            points = txn.points
    entry = None
    if points:
        entry = ledger.ledger_credit(points=points, transaction=txn, **credit)
    if member is not None and program.has_tiers:
        tiers.tier_on_transaction(transaction=txn, now=now)
    return result_of(txn, created=True, entry=entry)


def _basket(program: Program, data: TransactionInput, active: list) -> rules.Basket:
    """The purchase as the `active` rules see it; member facts are fetched only when one of them asks."""
    member, needs = data.member, rules.rules_need(active)
    first_purchase = "first_purchase" in needs and not (
        Transaction.objects.filter(member=member, kind=Transaction.Kind.PURCHASE).exists()
    )
    tier = tier_current_for(member=member, program=program)
    return rules.Basket(
        program=program,
        total=data.total,
        lines=data.lines,
        store=data.store,
        channel=data.channel,
        occurred_at=data.occurred_at,
        birth_date=member.birth_date if member else None,
        first_purchase=first_purchase,
        tier_code=tier.code if tier else None,
        tier_multiplier=tier.earn_multiplier if tier else Decimal(1),
        paid_with_points=data.paid_with_points,
    )
