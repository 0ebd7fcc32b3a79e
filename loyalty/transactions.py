"""Purchases and returns from tills and web shops: each is recorded once and earns (or reverses) points once."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import connection, transaction
from django.utils import timezone

from core.db import insert_params, insert_plan, on_postgresql, prepared_statements_kept, unsaved
from core.errors import ApplicationError, Conflict, MemberNotActive, Unprocessable
from core.models import ApiClient, Program
from loyalty import ledger, referrals, rule_claims, rules, tiers
from loyalty.earning import earning_for_purchase, reversal_for_return
from loyalty.models import Entry, Transaction
from members.models import Member

# A till's clock may run a little ahead; beyond this a transaction "in the future" is refused.
CLOCK_SKEW = timedelta(minutes=5)
MAX_POINTS = 2**31 - 1  # what Transaction.points, an integer column, holds


@dataclass(frozen=True)
class TransactionInput:
    store: str
    external_id: str
    channel: str
    kind: str
    occurred_at: datetime
    currency: str
    total: Decimal
    lines: list[dict] = field(default_factory=list)
    member: Member | None = None
    original_external_id: str | None = None
    original_store: str | None = None
    paid_with_points: Decimal = Decimal(0)


@dataclass(frozen=True)
class TransactionResult:
    transaction: Transaction
    created: bool
    points: int  # signed: what this transaction added to the member's points (a return's is negative)
    pending: int
    available_at: datetime | None
    balance: ledger.Balance | None  # right after the transaction; None for anonymous purchases
    forgiven: int = 0  # what a return did not take back, under the available-only return policy
    known_member_number: str | None = None  # for a member not read (transaction_record_by_number)

    @property
    def member_number(self) -> str | None:
        if self.known_member_number is not None:
            return self.known_member_number
        return self.transaction.member.member_number if self.transaction.member_id else None


class TransactionMismatch(Conflict):
    code, title = "transaction_mismatch", "Another transaction with this store and external_id exists"


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
            return _replay(program, data)
        except Transaction.DoesNotExist:
            raise exc from None
    if data.kind == Transaction.Kind.PURCHASE:
        return _record_purchase(program, data, api_client, now)
    return _record_return(program, data, api_client, now)


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


def _new_transaction(program, data, api_client, now, **fields) -> Transaction:
    return unsaved(
        Transaction,
        program=program,
        store=data.store,
        external_id=data.external_id,
        channel=data.channel,
        kind=data.kind,
        occurred_at=data.occurred_at,
        currency=data.currency,
        total=data.total,
        lines=data.lines,
        paid_with_points=data.paid_with_points,
        api_client=api_client,
        created_at=now,
        **fields,
    )


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
    return _result(txn, created=True, entry=entry, member_number=member_number, available_from=credit["available_from"])


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
            return _result(txn, created=True, entry=entry, available_from=credit["available_from"])
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
    txn = _new_transaction(
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


def points_out_of_range(points: int) -> str:
    return f"The purchase would earn {points} points, more than one transaction can hold ({MAX_POINTS})."


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
    txn.pk = _insert_ignoring_conflict(txn)
    if txn.pk is None:
        return _replay(program, data)
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
    return _result(txn, created=True, entry=entry)


@transaction.atomic
def _record_return(program, data, api_client, now) -> TransactionResult:
    # Locking the purchase serialises its returns, so together they never reverse more than it earned.
    original = _original_for_update(program, data)
    # A return sent again must be answered with its first result before the checks below, which would refuse a
    # repeat of a full return as exceeding the purchase. Looking first is race-free here: the lock on the purchase
    # has made any earlier copy of this return commit already.
    if Transaction.objects.filter(program=program, store=data.store, external_id=data.external_id).exists():
        return _replay(program, data)
    member = original.member
    if data.member is not None and data.member.pk != original.member_id:
        raise Unprocessable(
            "The return names another member than the purchase.",
            code="member_mismatch",
            errors={"member": ["Differs from the purchase's member."]},
        )
    returned_total = original.returned_total + data.total
    if returned_total > original.total:
        raise Unprocessable(
            f"Purchase {original.external_id} had {original.total - original.returned_total} left to return, "
            f"not {data.total}.",
            code="return_exceeds_purchase",
            errors={"total": [f"At most {original.total - original.returned_total}."]},
        )
    to_reverse = reversal_for_return(
        earned=original.points,
        already_reversed=original.points_reversed,
        purchase_total=original.total,
        returned_total=returned_total,
    )
    txn = _new_transaction(
        program,
        data,
        api_client,
        now,
        member=member,
        original=original,
        points=-to_reverse,
        breakdown=_return_breakdown(original, to_reverse),
    )
    txn.pk = _insert_ignoring_conflict(txn)
    if txn.pk is None:
        return _replay(program, data)
    # Before any account lock of this return: it locks the referrer's and this member's accounts in key order.
    referrals.referral_on_return(
        program=program,
        original=original,
        returned_total=returned_total,
        now=now,
        transaction=txn,
        occurred_at=data.occurred_at,
    )
    Transaction.objects.filter(pk=original.pk).update(
        returned_total=returned_total, points_reversed=original.points_reversed + to_reverse
    )
    entry = None
    if to_reverse:
        earn = Entry.objects.filter(transaction=original, kind=Entry.Kind.EARN).values_list("pk", flat=True).first()
        entry = ledger.ledger_reverse(
            member_id=member.pk,
            points=to_reverse,
            earn_entry_id=earn,
            allow_negative=program.return_policy == Program.ReturnPolicy.ALLOW_NEGATIVE,
            occurred_at=data.occurred_at,
            now=now,
            transaction=txn,
            api_client=api_client,
        )
    if member is not None and program.has_tiers:
        tiers.tier_on_transaction(transaction=txn, now=now)
    return _result(txn, created=True, entry=entry, forgiven=to_reverse + (entry.points if entry else 0))


def _return_breakdown(original: Transaction, to_reverse: int) -> list[dict]:
    """A return's lines: the points it takes back shared among its purchase's lines (base, tier, each rule) in
    proportion to what each has still to give back, largest remainders rounded up, so they add up exactly; a
    return explains itself as its purchase does, and returns that end in a full return take back every line whole.
    A return's lines are negative."""
    left: dict[str, int] = {}
    for line in original.breakdown:
        left[line["rule"]] = left.get(line["rule"], 0) + line["points"]
    for lines in Transaction.objects.filter(original=original).values_list("breakdown", flat=True):
        for line in lines:
            if line["rule"] in left:
                left[line["rule"]] += line["points"]
    left = {code: points for code, points in left.items() if points > 0}
    whole = sum(left.values())
    if not to_reverse or not whole:
        return []
    shares = {code: to_reverse * points // whole for code, points in left.items()}
    by_remainder = sorted(left, key=lambda code: -(to_reverse * left[code] % whole))
    for code in by_remainder[: to_reverse - sum(shares.values())]:
        shares[code] += 1
    return [{"rule": code, "points": -points} for code, points in shares.items() if points]


def _basket(program: Program, data: TransactionInput, active: list) -> rules.Basket:
    """The purchase as the `active` rules see it; member facts are fetched only when one of them asks."""
    member, needs = data.member, rules.rules_need(active)
    first_purchase = "first_purchase" in needs and not (
        Transaction.objects.filter(member=member, kind=Transaction.Kind.PURCHASE).exists()
    )
    tier = tiers.tier_current_for(member=member, program=program)
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


def _original_for_update(program: Program, data: TransactionInput) -> Transaction:
    if not data.original_external_id:
        raise Unprocessable(
            "A return names the purchase it returns.",
            code="original_required",
            errors={"original_external_id": ["This field is required for returns."]},
        )
    candidates = Transaction.objects.filter(
        program=program, kind=Transaction.Kind.PURCHASE, external_id=data.original_external_id
    )
    if data.original_store:
        candidates = candidates.filter(store=data.original_store)
    found = list(candidates.values_list("pk", "store")[:50])
    if len(found) > 1:
        found = [f for f in found if f[1] == data.store] or found
    if not found:
        raise Unprocessable(
            f"No purchase {data.original_external_id} to return.",
            code="original_not_found",
            errors={"original_external_id": ["No such purchase."]},
        )
    if len(found) > 1:
        raise Unprocessable(
            f"Several stores sent purchase {data.original_external_id}; name the store with original_store.",
            code="original_ambiguous",
            errors={"original_store": ["Required: the external id is not unique across stores."]},
        )
    return Transaction.objects.select_for_update(of=("self",)).select_related("member").get(pk=found[0][0])


def _insert_ignoring_conflict(instance) -> int | None:
    """INSERT the unsaved instance; None when a unique constraint says it exists already.
    One round trip, and no check-then-insert race: the database decides."""
    plan, columns = insert_plan(type(instance))
    sql = (
        f"INSERT INTO {instance._meta.db_table} ({columns}) VALUES ({', '.join(['%s'] * len(plan))}) "
        "ON CONFLICT DO NOTHING RETURNING id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, insert_params(instance, plan))
        row = cursor.fetchone()
    return row[0] if row else None


def _replay(program: Program, data: TransactionInput) -> TransactionResult:
    """The first result of a transaction sent again. Another transaction under the same key is a conflict."""
    existing = Transaction.objects.get(program=program, store=data.store, external_id=data.external_id)
    same_member = (
        data.member is None
        and data.kind == Transaction.Kind.RETURN
        or existing.member_id == (data.member.pk if data.member else None)
    )
    if not (same_member and existing.kind == data.kind and existing.total == data.total):
        raise TransactionMismatch(
            f"Store {data.store} already sent transaction {data.external_id}, with other content."
        )
    entry = (
        Entry.objects.select_related("lot").filter(transaction=existing).exclude(kind=Entry.Kind.ADJUST).first()
        if existing.member_id
        else None
    )
    forgiven = -existing.points + (entry.points if entry else 0) if existing.kind == Transaction.Kind.RETURN else 0
    return _result(existing, created=False, entry=entry, forgiven=forgiven)


def _result(
    txn: Transaction,
    *,
    created: bool,
    entry: Entry | None,
    forgiven: int = 0,
    member_number: str | None = None,
    available_from: datetime | None = None,
) -> TransactionResult:
    """The result of `txn` and its `entry`; an earn entry's points mature at `available_from`, else at its lot's."""
    pending, available_at, balance = 0, None, None
    if entry is not None:
        balance = ledger.Balance.after(entry)
        lot = None
        if entry.kind == Entry.Kind.EARN and (available_from is None or Entry.lot.is_cached(entry)):
            lot = getattr(entry, "lot", None)  # read only where not known: the one statement knows its lot's
        if lot is not None and lot.expires_at is not None and lot.expires_at <= entry.created_at:
            # Points that expired before they arrived were expired at once (ledger_credit): the balance is after that.
            expiry = Entry.objects.filter(kind=Entry.Kind.EXPIRE, draws__lot=lot).first()
            balance = ledger.Balance.after(expiry) if expiry is not None else balance
        if available_from is None and lot is not None:
            available_from = lot.available_from
        if available_from is not None and available_from > entry.created_at:
            pending, available_at = entry.points, available_from
    elif txn.member_id:
        balance = ledger.ledger_balance(member_id=txn.member_id)
    return TransactionResult(
        transaction=txn,
        created=created,
        points=entry.points if entry else 0,
        pending=pending,
        available_at=available_at,
        balance=balance,
        forgiven=forgiven,
        known_member_number=member_number,
    )
