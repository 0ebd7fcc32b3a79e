"""Bulk import (`manage.py import_transactions`): the same ledger as the per-row path, idempotent, all-or-nothing."""

import csv
import gc
import json
import random
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from operator import itemgetter
from types import SimpleNamespace

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.models import Program
from loyalty import ledger
from loyalty.earning import months_later
from loyalty.imports import FIELDS, OPTIONAL_FIELDS, TransactionFile, transactions_import
from loyalty.imports import service as service_module
from loyalty.imports import writing as writing_module
from loyalty.imports.report import ImportAborted
from loyalty.imports.rows import RowInvalid, RowParser
from loyalty.imports.writing import chunk_write
from loyalty.models import Account, Draw, Entry, Lot, Transaction
from loyalty.points import points_adjust
from loyalty.transactions import TransactionInput, transaction_record
from loyalty.verify import ledger_verify
from members.models import Member
from tests.factories import MemberFactory
from tests.threads import until_someone_waits_on_a_lock

pytestmark = pytest.mark.django_db(transaction=False)


def _row(external_id, member, total, occurred_at, **extra):
    row = {
        "store": "S1",
        "external_id": external_id,
        "channel": "pos",
        "member": member.member_number if member else "",
        "type": "purchase",
        "original_external_id": "",
        "occurred_at": occurred_at.isoformat(),
        "currency": "SEK",
        "total": str(total),
    }
    row.update(extra)
    return row


def _csv(tmp_path, rows, name="tx.csv"):
    path = tmp_path / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _jsonl(tmp_path, rows, name="tx.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _import(program, path, **kw):
    return transactions_import(program=program, rows=TransactionFile(path), **kw)


def _record_per_row(program, rows, members):
    by_number = {m.member_number: m for m in members}
    for row in rows:
        transaction_record(
            program=program,
            data=TransactionInput(
                store=row["store"],
                external_id=row["external_id"],
                channel=row["channel"],
                kind=row["type"],
                # As the API's DateTimeField hands it over: in the server's zone.
                occurred_at=datetime.fromisoformat(row["occurred_at"]).astimezone(timezone.get_current_timezone()),
                currency=row["currency"],
                total=Decimal(row["total"]),
                member=by_number.get(row["member"]),
                original_external_id=row["original_external_id"] or None,
            ),
        )


def _ledger_state():
    """The ledger by business keys (member numbers, store/external id), not by row ids: each member's entries and
    lots in the order they were written (an import writes members in an order of its own, each one's rows in file
    order)."""
    key = {t.pk: (t.store, t.external_id) for t in Transaction.objects.all()}
    number = dict(Account.objects.values_list("pk", "member__member_number"))
    return {
        "accounts": sorted((number[a.pk], a.available, a.pending, a.lifetime_earned) for a in Account.objects.all()),
        "entries": [
            (
                number[e.account_id],
                e.kind,
                e.points,
                e.available_after,
                e.pending_after,
                e.held_after,
                e.occurred_at,
                key.get(e.transaction_id),
            )
            for e in sorted(Entry.objects.all(), key=lambda e: (number[e.account_id], e.pk))
        ],
        "lots": [
            (
                number[lot.account_id],
                lot.amount,
                lot.remaining,
                lot.available_from,
                lot.expires_at,
                lot.matured,
                key.get(lot.entry.transaction_id),
            )
            for lot in sorted(Lot.objects.select_related("entry"), key=lambda lot: (number[lot.account_id], lot.pk))
        ],
        "draws": sorted(
            (key.get(d.entry.transaction_id) or ("", ""), d.entry.kind, d.points)
            for d in Draw.objects.select_related("entry")
        ),
        "transactions": sorted(
            (t.store, t.external_id, t.member_id, t.kind, t.points, json.dumps(t.breakdown), t.total, t.points_reversed)
            for t in Transaction.objects.all()
        ),
    }


def _per_row_state(program, rows, members):
    """What the per-row path makes of the same rows, from the same starting state, then undone."""
    with transaction.atomic():
        _record_per_row(program, rows, members)
        state = _ledger_state()
        transaction.set_rollback(True)
    return state


def _purchases(members, count, start):
    # Late evenings in UTC are the next day at +01:00; around a leap day that moves the expiry (counted in
    # calendar months) by a day unless the import reads times in the server's zone, as the API does.
    cet = dt_timezone(timedelta(hours=1))
    times = [start + timedelta(days=d, hours=h) for d in (0, 29, 30, 59, 90) for h in (0, 13, 14)]
    times += [t.astimezone(cet) for t in times]
    return [
        _row(f"T{i}", members[i % len(members)] if i % 7 else None, Decimal("12.50") + i * 3, times[i % len(times)])
        for i in range(count)
    ]


def _straddling(members):
    """Purchases whose times run across the moments their points mature (14 pending days) and expire (24 months):
    on those days some points have matured or expired when the import starts and some have not."""
    now = timezone.now().replace(microsecond=0)
    times = [
        at + timedelta(minutes=37 * k)
        for at in (now - timedelta(days=14), months_later(now, -24))
        for k in (-9, -1, 1, 9)
    ]
    return [_row(f"T{i}", members[i % len(members)], Decimal("20.00") + i, at) for i, at in enumerate(times)]


@pytest.mark.parametrize("zone", ["UTC", "Europe/Stockholm"])
@pytest.mark.parametrize(
    "when",
    ["recent", "leap day", "straddling"],
    ids=["recent", "around a leap day, expired before it arrives", "straddling"],
)
def test_import_makes_the_same_ledger_as_the_per_row_path(program, tmp_path, settings, when, zone):
    # given: purchases over the last four months, or around 29 February 2024, whose points (24 months) expired
    # before they were imported, or around the times points mature and expire; the server's time zone decides the
    # calendar (Stockholm's changes its offset twice a year)
    settings.TIME_ZONE = zone
    Program.objects.filter(pk=program.pk).update(pending_days=14 if when == "straddling" else 0, expiry_months=24)
    program.refresh_from_db()
    members = [MemberFactory() for _ in range(5)]
    if when == "straddling":
        rows = _straddling(members)
    else:
        start = datetime(2024, 1, 30, 9, 30, tzinfo=UTC)
        if when == "recent":
            start = (timezone.now() - timedelta(days=120)).replace(hour=9, minute=30, second=0, microsecond=0)
        rows = _purchases(members, 60, start)
    expected = _per_row_state(program, rows, members)
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=7)
    # then
    assert _ledger_state() == expected
    assert report.read == report.imported == len(rows)
    assert report.points_credited == sum(e[2] for e in expected["entries"] if e[1] == "earn")
    assert ledger_verify() == []
    if when == "straddling":  # each way, on either day
        assert {lot.matured for lot in Lot.objects.all()} == {True, False}
        assert Entry.objects.filter(kind="expire").count() == 2


def test_points_held_for_a_till_are_recorded_on_imported_entries_as_the_per_row_path_records_them(program, tmp_path):
    # given: one member has 120 of 300 points held for a till
    members = [MemberFactory() for _ in range(2)]
    points_adjust(member=members[0], points=300, reason="seed")
    ledger.ledger_hold(member_id=members[0].pk, points=120)
    rows = _purchases(members, 10, datetime(2025, 3, 1, tzinfo=UTC))
    expected = _per_row_state(program, rows, members)
    # when
    _import(program, _csv(tmp_path, rows), batch_size=4)
    # then
    assert _ledger_state() == expected
    assert set(Entry.objects.filter(account_id=members[0].pk, kind="earn").values_list("held_after", flat=True)) == {
        120
    }


@pytest.mark.parametrize("enabled", [True, False], ids=["on before", "off before"])
def test_the_cycle_collector_is_off_while_an_import_runs_and_as_before_after_it(program, tmp_path, enabled):
    # given
    path = _csv(tmp_path, _purchases([MemberFactory()], 3, datetime(2025, 3, 1, tzinfo=UTC)))
    during = []
    (gc.enable if enabled else gc.disable)()
    try:
        # when
        _import(program, path, progress=lambda stage, count: during.append(gc.isenabled()))
        # then
        after = gc.isenabled()
    finally:
        gc.enable()
    assert during and set(during) == {False}
    assert after is enabled


def test_the_cycle_collector_comes_back_after_an_import_that_fails(program, tmp_path, monkeypatch):
    # given: a chunk whose writing fails
    path = _csv(tmp_path, _purchases([MemberFactory()], 3, datetime(2025, 3, 1, tzinfo=UTC)))

    def failing(**kw):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(service_module, "chunk_write", failing)
    gc.enable()
    # when
    with pytest.raises(RuntimeError, match="went away"):
        _import(program, path, writers=1)
    # then
    assert gc.isenabled()
    assert not Transaction.objects.exists()


def test_rerun_imports_nothing(program, tmp_path):
    # given
    members = [MemberFactory() for _ in range(3)]
    path = _csv(tmp_path, _purchases(members, 20, datetime(2025, 3, 1, tzinfo=UTC)))
    _import(program, path, batch_size=6)
    before = _ledger_state()
    # when
    report = _import(program, path, batch_size=6)
    # then
    assert (report.imported, report.already_present, report.points_credited) == (0, 20, 0)
    assert _ledger_state() == before


def test_new_purchases_whose_ids_collide_are_refused_not_taken_for_repeats(program, tmp_path):
    # given: recorded purchases, and the transactions' sequence set back below their ids (as a restore may leave it)
    members = [MemberFactory() for _ in range(3)]
    rows = _purchases(members, 25, datetime(2025, 3, 1, tzinfo=UTC))
    _import(program, _csv(tmp_path, rows[:20], name="first.csv"))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('loyalty_transaction', 'id'), "
            "(SELECT min(id) FROM loyalty_transaction) - 1)"
        )
    # when: new purchases draw ids that recorded ones hold
    with pytest.raises(IntegrityError, match="loyalty_transaction_pkey"):
        _import(program, _csv(tmp_path, rows[20:], name="second.csv"))
    # then: refused, not reported as already present and dropped
    assert Transaction.objects.count() == 20


def test_an_overlapping_file_imports_only_its_new_rows(program, tmp_path):
    # given a file whose chunks mix recorded and new purchases, so the fast COPY is refused and undone
    members = [MemberFactory() for _ in range(3)]
    rows = _purchases(members, 24, datetime(2025, 3, 1, tzinfo=UTC))
    expected = _per_row_state(program, rows, members)
    _import(program, _csv(tmp_path, rows[:8] + rows[12:16], name="first.csv"), batch_size=5)
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=5)
    # then
    assert (report.imported, report.already_present) == (12, 12)
    assert Transaction.objects.count() == 24
    assert ledger_verify() == []
    assert _ledger_state()["transactions"] == expected["transactions"]


@pytest.mark.parametrize(
    "columns",
    [FIELDS, FIELDS + OPTIONAL_FIELDS, tuple(reversed(FIELDS + OPTIONAL_FIELDS))],
    ids=["required columns", "all columns", "all columns reversed"],
)
def test_a_csv_files_rows_read_as_the_same_fields_given_by_name_would_be(program, tmp_path, columns):
    # given: plain and odd rows in a CSV file of these columns
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [
        _row("A", member, "10.00", at),
        _row("B", None, "10.00", at),
        {**_row("C", member, "10.00", at), "member": "   "},
        _row("D", member, "1e2", at),
        _row("E", member, "10.00", at, type="return", original_external_id="A"),
        _row(" ", member, "10.00", at),
        _row("G", member, "10.00", at, currency="EUR"),
        _row("H", member, "10.00", at, lines='[{"sku": "X"}]', original_store="S2"),
        _row("I", member, "10.00", at, lines="{}", original_store="S2"),
    ]
    path = tmp_path / "tx.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    parser = RowParser(program, timezone.now())

    def outcome(line, fields):
        try:
            return parser.parse(line, fields)
        except RowInvalid as exc:
            return exc.errors

    # when
    read = [outcome(line, fields) for line, fields in TransactionFile(path)]
    # then: each as its cells would be read by name, the columns the file lacks left out
    by_name = [outcome(line, {k: v for k, v in row.items() if k in columns}) for line, row in enumerate(rows, 2)]
    assert read == by_name
    refused = [
        (line, sorted({name.split("[")[0] for name, _ in r})) for line, r in enumerate(read, 2) if isinstance(r, list)
    ]
    odd_lines = [(9, ["lines"]), (10, ["lines"])] if "lines" in columns else []
    assert refused == [(4, ["member"]), (5, ["total"]), (7, ["external_id"]), (8, ["currency"]), *odd_lines]


def test_odd_rows_are_refused_as_the_field_checks_refuse_them(program, tmp_path):
    # given rows the quick path for plain rows must hand to the field-by-field checks
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [
        {**_row("A", member, 10, at), "member": "   "},
        _row("B", member, 10, at, original_store=0),
        _row("C", member, 10, at, lines={}),
        _row("D", member, "1e2", at),
        _row("E", member, 10, at),
    ]
    # when
    report = _import(program, _jsonl(tmp_path, rows))
    # then
    assert [(e.line, e.field) for e in report.errors] == [
        (1, "member"),
        (2, "original_store"),
        (3, "lines"),
        (4, "total"),
    ]
    assert (report.invalid, report.imported) == (4, 0)
    assert not Transaction.objects.exists()


@pytest.mark.parametrize("zone", ["UTC", "Europe/Stockholm"])
@pytest.mark.parametrize(
    "given",
    [
        "2025-03-01T10:00:00+00:00",
        "2025-03-01 10:00:00+00:00",
        "2025-03-01T10:00:00Z",
        "2025-03-01T10:00:00.0+00:00",
        "2025-03-01T11:00:00+01:00",
        "2025-W09-6T10:00:00+00:00",  # an ISO week date, as long as the usual form
        "2025-03-01T100000.0+00:00",  # a time without colons, as long as the usual form
    ],
)
def test_a_time_is_written_as_it_came_only_where_that_is_how_it_would_be_written(program, settings, zone, given):
    # given: a server zone, and a purchase's time in one of the forms Python reads
    settings.TIME_ZONE = zone
    parser = RowParser(program, timezone.now())
    # when
    row = parser.parse(2, {**_row("A", None, "10.00", datetime(2025, 3, 1, tzinfo=UTC)), "occurred_at": given})
    # then: the same instant; its text as given only where it is the very text the import would write
    assert row.occurred_at == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert row.occurred_text in ("", row.occurred_at.isoformat(" "))
    assert bool(row.occurred_text) == (zone == "UTC" and given.endswith(":00+00:00") and given[4] == given[7] == "-")


def test_a_time_of_24_00_is_not_written_as_it_came(program, monkeypatch):
    # given: Python reading 24:00 as the next day's midnight, as later versions do (3.11 refuses it)
    from loyalty.imports import rows as rows_module

    class Reading(datetime):
        @classmethod
        def fromisoformat(cls, text):
            if text[11:13] == "24":
                return datetime.fromisoformat(text[:11] + "00" + text[13:]) + timedelta(days=1)
            return datetime.fromisoformat(text)

    monkeypatch.setattr(rows_module, "datetime", Reading)
    parser = RowParser(program, timezone.now())
    # when
    row = parser.parse(
        2, {**_row("A", None, "10.00", datetime(2025, 3, 1, tzinfo=UTC)), "occurred_at": "2025-03-01T24:00:00+00:00"}
    )
    # then: its text is written anew, so that its first ten characters are its date, as Earnings.lot takes them
    assert row.occurred_at == datetime(2025, 3, 2, tzinfo=UTC)
    assert row.occurred_text == ""


def test_the_rows_of_a_member_share_one_copy_of_their_number(program):
    # given: two rows naming the same member, each number read as a string of its own, as the CSV reader gives them
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    parser = RowParser(program, timezone.now())
    first, second = ({**_row(e, member, "10.00", at), "member": "".join(member.member_number)} for e in "AB")
    assert first["member"] is not second["member"]
    wrong = member.member_number[:-1] + str((int(member.member_number[-1]) + 1) % 10)
    # when
    rows = parser.parse(2, first), parser.parse(3, second)
    # then: both hold the first row's copy (the check keeps every purchase's owner until the import ends)
    assert rows[0].member == rows[1].member == member.member_number
    assert rows[1].member is rows[0].member
    # and a number whose check digit is wrong is refused, the first time and when it comes again
    for line in (4, 5):
        with pytest.raises(RowInvalid) as refused:
            parser.parse(line, {**first, "member": f" {wrong} "})
        assert [name for name, _ in refused.value.errors] == ["member"]


@pytest.mark.parametrize("total", ["1e5", "1_000", "+5", "١٢", "Infinity", "NaN", "12,50", "-3"])
def test_a_total_not_written_as_the_contract_writes_amounts_is_refused(program, tmp_path, total):
    # given: Python's Decimal would read each of these but the last two; the API refuses them all
    member = MemberFactory()
    rows = [
        _row("A", member, total, datetime(2025, 3, 1, tzinfo=UTC)),
        _row("B", member, " 10.50 ", datetime(2025, 3, 1, tzinfo=UTC)),
    ]
    # when
    report = _import(program, _csv(tmp_path, rows))
    # then: nothing is written; the padded but plain amount was not the problem
    assert [(e.line, e.field) for e in report.errors] == [(2, "total")]
    assert not Transaction.objects.exists()


def test_json_numbers_in_a_csv_lines_cell_are_numbers(program, tmp_path):
    # given: a CSV cell of lines whose amounts are JSON numbers, as the API takes them
    member = MemberFactory()
    lines = [{"sku": "A", "quantity": 1, "unit_price": 12.5, "amount": 12.5}]
    row = {**_row("L1", member, "12.50", datetime(2025, 3, 1, tzinfo=UTC)), "lines": json.dumps(lines)}
    path = tmp_path / "lines.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    # when
    report = _import(program, path)
    # then
    assert (report.errors, report.imported) == ([], 1)
    assert Transaction.objects.get().lines[0]["amount"] == "12.50"


@pytest.mark.parametrize("batch_size", [5000, 1], ids=["member-looked-up-with-it", "member-found-before"])
def test_a_purchase_earning_more_points_than_a_transaction_holds_is_a_row_error(program, tmp_path, batch_size):
    # given: the largest total there is, at 1 point per unit, between two plain purchases; in chunks of one row, its
    # member is known from the chunk before when it is read
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [_row("OK1", member, "10.00", at), _row("BIG", member, "9999999999.99", at), _row("OK2", member, "1", at)]
    # when
    report = _import(program, _csv(tmp_path, rows), skip_invalid=True, batch_size=batch_size)
    # then: that row is refused as the API refuses it, and the rest is imported
    assert [(e.line, e.field) for e in report.errors] == [(3, "total")]
    assert "more than one transaction can hold" in report.errors[0].message
    assert sorted(Transaction.objects.values_list("external_id", flat=True)) == ["OK1", "OK2"]
    assert ledger_verify() == []


def test_a_bad_row_imports_nothing_and_names_line_and_field(program, tmp_path):
    # given
    member = MemberFactory()
    rows = _purchases([member], 10, datetime(2025, 3, 1, tzinfo=UTC))
    rows[4]["total"] = "12.345"
    rows[7]["occurred_at"] = "2025-03-01T10:00:00"
    rows[8]["member"] = "1234567890"
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=3)
    # then
    assert [(e.line, e.field) for e in report.errors] == [(6, "total"), (9, "occurred_at"), (10, "member")]
    assert "decimal places" in report.errors[0].message
    assert "offset" in report.errors[1].message
    assert (report.invalid, report.imported) == (3, 0)
    assert not Transaction.objects.exists()
    assert not Account.objects.exists()


def test_skip_invalid_imports_the_rest(program, tmp_path):
    # given
    member = MemberFactory()
    rows = _purchases([member], 6, datetime(2025, 3, 1, tzinfo=UTC))
    rows[2]["channel"] = "fax"
    rows[3]["currency"] = "EUR"
    # when
    report = _import(program, _csv(tmp_path, rows), skip_invalid=True)
    # then
    assert [(e.line, e.field) for e in report.errors] == [(4, "channel"), (5, "currency")]
    assert (report.read, report.invalid, report.imported) == (6, 2, 4)
    assert set(Transaction.objects.values_list("external_id", flat=True)) == {"T0", "T1", "T4", "T5"}
    assert ledger_verify() == []


def test_unknown_and_suspended_members_are_row_errors(program, tmp_path):
    # given
    suspended = MemberFactory(status="suspended")
    stranger = MemberFactory(program=Program.objects.create(code="OTHER", name="Other", currency="SEK"))
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [_row("A", suspended, 100, at), _row("B", stranger, 100, at)]
    # when
    report = _import(program, _csv(tmp_path, rows))
    # then
    assert [(e.line, e.field) for e in report.errors] == [(2, "member"), (3, "member")]
    assert "suspended" in report.errors[0].message
    assert "No member" in report.errors[1].message
    assert not Transaction.objects.exists()


def test_members_are_looked_up_once_per_import_not_once_per_chunk(program, tmp_path):
    # given: six chunks that name the same two members
    first, second = MemberFactory(), MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [_row(f"T{i}", (first, second)[i % 2], 10, at) for i in range(12)]
    # when
    with CaptureQueriesContext(connection) as queries:
        report = _import(program, _csv(tmp_path, rows), batch_size=2)
    # then
    lookups = [q["sql"] for q in queries if "member_number = ANY" in q["sql"]]
    assert len(lookups) == 1
    assert report.imported == 12


@pytest.mark.parametrize("skip_invalid", [False, True], ids=["stops", "skips"])
def test_a_member_suspended_after_the_check_earns_nothing_from_later_chunks(
    program, tmp_path, monkeypatch, skip_invalid
):
    # given: a member found active by the check of the whole file, suspended before the second chunk is written
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [_row(f"T{i}", member, 10, at) for i in (1, 2, 3)]
    written = []

    def suspending(**kw):
        if written:
            Member.objects.filter(pk=member.pk).update(status=Member.Status.SUSPENDED)
        written.append(kw["chunk"].size)
        chunk_write(**kw)

    monkeypatch.setattr(service_module, "chunk_write", suspending)
    path = _csv(tmp_path, rows)
    # when
    if skip_invalid:
        report = _import(program, path, batch_size=2, writers=1, skip_invalid=True)
    else:
        with pytest.raises(ImportAborted, match="line 4: member: Member .* is suspended"):
            _import(program, path, batch_size=2, writers=1)
    # then: the first chunk stays imported; the suspended member's later row is not
    assert sorted(Transaction.objects.values_list("external_id", flat=True)) == ["T1", "T2"]
    assert Account.objects.get(member=member).lifetime_earned == 20
    if skip_invalid:
        assert [(e.line, e.field) for e in report.errors] == [(4, "member")]
    assert ledger_verify() == []


def test_a_member_in_debt_has_it_settled_by_imported_points(program, tmp_path):
    # given: 100 earned, 80 spent, then the purchase returned in full, which leaves -80 under allow_negative
    member = MemberFactory()
    at = timezone.now() - timedelta(days=3)
    _record_per_row(program, [_row("P0", member, 100, at)], [member])
    ledger.ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=80, occurred_at=at, now=timezone.now())
    _record_per_row(program, [_row("R0", member, 100, at, type="return", original_external_id="P0")], [member])
    assert Account.objects.get(pk=member.pk).available == -80
    rows = [_row("P1", member, 50, at), _row("P2", member, 45, at)]
    expected = _per_row_state(program, rows, [member])
    # when
    _import(program, _csv(tmp_path, rows))
    # then
    assert _ledger_state() == expected
    account = Account.objects.get(pk=member.pk)
    assert (account.available, account.pending) == (15, 0)
    settled = sorted(
        Draw.objects.filter(entry__transaction__external_id__in=["P1", "P2"]).values_list("points", flat=True)
    )
    assert settled == [30, 50]
    assert ledger_verify() == []


def test_pending_days_keep_recent_points_pending(program, tmp_path):
    # given
    Program.objects.filter(pk=program.pk).update(pending_days=14)
    program.refresh_from_db()
    member = MemberFactory()
    now = timezone.now()
    rows = [_row("OLD", member, 200, now - timedelta(days=30)), _row("NEW", member, 75, now - timedelta(days=2))]
    expected = _per_row_state(program, rows, [member])
    # when
    _import(program, _csv(tmp_path, rows))
    # then
    assert _ledger_state() == expected
    account = Account.objects.get(pk=member.pk)
    assert (account.available, account.pending, account.lifetime_earned) == (200, 75, 275)
    recent = Lot.objects.get(entry__transaction__external_id="NEW")
    assert not recent.matured
    assert recent.available_from == datetime.fromisoformat(rows[1]["occurred_at"]) + timedelta(days=14)
    assert ledger_verify() == []


def test_returns_in_the_file_reverse_their_purchases(program, tmp_path):
    # given
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = [
        _row("P1", member, 300, at),
        _row("R1", None, 100, at + timedelta(days=1), type="return", original_external_id="P1"),
        _row("P2", member, 40, at + timedelta(days=2)),
    ]
    # when
    report = _import(program, _jsonl(tmp_path, rows))
    # then
    assert (report.imported, report.points_credited, report.points_reversed) == (3, 340, 100)
    assert Account.objects.get(pk=member.pk).available == 240
    assert Transaction.objects.get(external_id="P1").points_reversed == 100
    assert ledger_verify() == []


@pytest.mark.parametrize("writers", [1, 2])
def test_a_return_before_a_purchase_reverses_what_the_member_had_before_it(program, tmp_path, writers):
    # given: returns take back only what is still available; a member spent the points of a recorded purchase
    Program.objects.filter(pk=program.pk).update(return_policy=Program.ReturnPolicy.AVAILABLE_ONLY)
    program.refresh_from_db()
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    _record_per_row(program, [_row("P0", member, 200, at)], [member])
    points_adjust(member=member, points=-200, reason="spent")
    rows = [
        _row("R0", member, 200, at + timedelta(days=1), type="return", original_external_id="P0"),
        _row("P1", member, 300, at + timedelta(days=2)),
    ]
    expected = _per_row_state(program, rows, [member])
    # when: the return and the purchase after it fit in one chunk
    _import(program, _csv(tmp_path, rows), writers=writers)
    # then: the return found nothing left to take, as it would have on the per-row path
    assert _ledger_state() == expected
    assert Account.objects.get(pk=member.pk).available == 300
    assert ledger_verify() == []


def test_a_return_without_its_purchase_is_a_row_error(program, tmp_path):
    # given
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = [_row("R1", None, 10, at, type="return", original_external_id="NOPE")]
    # when
    report = _import(program, _jsonl(tmp_path, rows))
    # then
    assert [(e.line, e.field) for e in report.errors] == [(1, "original_external_id")]
    assert not Transaction.objects.exists()


def test_past_a_thousand_errors_those_of_the_lowest_lines_are_kept_in_line_order(program, tmp_path):
    # given: a return without its purchase at line 1 (found only once the whole file is read), then 1,001 bad totals
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = [_row("R1", None, 10, at, type="return", original_external_id="NOPE")]
    rows += [_row(f"T{i}", None, "-1.00", at) for i in range(1001)]
    # when
    report = _import(program, _jsonl(tmp_path, rows))
    # then: line 1's error is kept, and the 1,000 kept are lines 1-1,000 in order; every bad row is counted
    assert [e.line for e in report.errors] == list(range(1, 1001))
    assert report.errors[0].field == "original_external_id"
    assert report.invalid == 1002
    assert not Transaction.objects.exists()


def test_a_return_naming_a_store_without_its_purchase_imports_nothing_and_names_the_line(program, tmp_path):
    # given: purchase T1 at S1 in the file and T2 recorded at S1, returned as if bought at S2
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    _record_per_row(program, [_row("T2", member, "50.00", at)], [member])
    rows = [
        _row("T1", member, "30.00", at),
        {**_row("R1", member, "10.00", at, type="return", original_external_id="T1"), "original_store": "S2"},
        {**_row("R2", member, "10.00", at, type="return", original_external_id="T2"), "original_store": "S2"},
        {**_row("R3", member, "10.00", at, type="return", original_external_id="T2"), "original_store": "S1"},
    ]
    # when
    report = _import(program, _jsonl(tmp_path, rows))
    # then
    assert [(e.line, e.field) for e in report.errors] == [(2, "original_external_id"), (3, "original_external_id")]
    assert "at store S2" in report.errors[0].message
    assert Transaction.objects.count() == 1


def test_jsonl_lines_are_checked_and_stored(program, tmp_path):
    # given
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    good = _row("P1", member, "30.00", at)
    good["lines"] = [
        {"sku": "A", "quantity": "2", "unit_price": "10.00", "amount": "20.00"},
        {"sku": "B", "category": "food", "quantity": 1, "unit_price": "10", "amount": "10"},
    ]
    bad = _row("P2", member, "30.00", at)
    bad["lines"] = [{"sku": "A", "quantity": "1", "unit_price": "10.00", "amount": "10.00"}]
    path = tmp_path / "tx.ndjson"
    path.write_text(json.dumps(good) + "\n\nnot json\n" + json.dumps(bad) + "\n")
    # when
    report = _import(program, path, skip_invalid=True)
    # then
    assert [(e.line, e.field) for e in report.errors] == [(3, "row"), (4, "lines")]
    assert Transaction.objects.get(external_id="P1").lines[1] == {
        "sku": "B",
        "category": "food",
        "quantity": "1.000",
        "unit_price": "10.00",
        "amount": "10.00",
    }
    assert Account.objects.get(pk=member.pk).available == 30


def test_credit_many_equals_credit_one_by_one(program):
    # given: two members, credits mixing pending and available, one member in debt
    a, b = MemberFactory(), MemberFactory()
    now = timezone.now()
    ledger.ledger_credit(
        member_id=a.pk, kind=Entry.Kind.EARN, points=10, occurred_at=now, available_from=now, expires_at=None, now=now
    )
    ledger.ledger_debit(member_id=a.pk, kind=Entry.Kind.REDEEM, points=10, occurred_at=now, now=now)
    ledger.ledger_reverse(member_id=a.pk, points=10, earn_entry_id=None, allow_negative=True, occurred_at=now, now=now)
    credits = [
        {
            "member_id": a.pk,
            "kind": Entry.Kind.EARN,
            "points": 4,
            "occurred_at": now,
            "available_from": now,
            "expires_at": now + timedelta(days=700),
        },
        {
            "member_id": b.pk,
            "kind": Entry.Kind.EARN,
            "points": 7,
            "occurred_at": now,
            "available_from": now + timedelta(days=5),
            "expires_at": None,
        },
        {
            "member_id": a.pk,
            "kind": Entry.Kind.ADJUST,
            "points": 9,
            "occurred_at": now,
            "available_from": now,
            "expires_at": None,
            "reason": "goodwill",
        },
    ]

    def state():
        return (
            sorted(Account.objects.values_list("pk", "available", "pending", "lifetime_earned")),
            list(
                Entry.objects.order_by("pk").values_list(
                    "account_id", "kind", "points", "available_after", "pending_after", "reason"
                )
            ),
            list(Lot.objects.order_by("entry_id").values_list("account_id", "amount", "remaining", "matured")),
            sorted(Draw.objects.values_list("lot__amount", "points")),
        )

    with transaction.atomic():
        for credit in credits:
            ledger.ledger_credit(now=now, **credit)
        expected = state()
        transaction.set_rollback(True)
    # when
    ids = ledger.ledger_credit_many(credits=credits, now=now)
    # then
    assert state() == expected
    assert ids == sorted(ids) and len(ids) == 3
    assert ledger_verify() == []


def test_command_prints_a_summary(program, tmp_path, capsys):
    # given
    member = MemberFactory()
    path = _csv(tmp_path, _purchases([member], 5, datetime(2025, 3, 1, tzinfo=UTC)))
    # when
    call_command("import_transactions", str(path), "--no-progress")
    # then
    out = capsys.readouterr().out
    assert "read 5, imported 5, already present 0, invalid 0" in out
    assert "rows/s" in out


def test_command_refuses_a_bad_file_and_writes_nothing(program, tmp_path):
    # given
    member = MemberFactory()
    path = _csv(tmp_path, _purchases([member], 3, datetime(2025, 3, 1, tzinfo=UTC)))
    headless = tmp_path / "bad.csv"
    headless.write_text("store,external_id,total\nS1,T1,10\n")
    broken = tmp_path / "broken.csv"
    broken.write_bytes(path.read_bytes() + b"S1,T9,pos,,purchase,,2025-03-01T00:00:00+00:00,SEK,\xff\n")
    # when / then
    with pytest.raises(CommandError, match="No programme 'NOPE'"):
        call_command("import_transactions", str(path), "--program", "NOPE", "--no-progress")
    with pytest.raises(CommandError, match="lacks channel, member, type"):
        call_command("import_transactions", str(headless), "--no-progress")
    with pytest.raises(CommandError, match="not UTF-8"):
        call_command("import_transactions", str(broken), "--no-progress", "--skip-invalid")
    with pytest.raises(CommandError, match="--format"):
        call_command("import_transactions", str(tmp_path / "tx.txt"), "--no-progress")
    with pytest.raises(CommandError, match="no such file"):
        call_command("import_transactions", str(tmp_path / "missing.csv"), "--no-progress")
    assert not Transaction.objects.exists()


def test_command_with_bad_rows_fails_unless_skip_invalid(program, tmp_path, capsys):
    # given
    member = MemberFactory()
    rows = _purchases([member], 3, datetime(2025, 3, 1, tzinfo=UTC))
    rows[1]["type"] = "refund"
    path = _csv(tmp_path, rows)
    # when / then
    with pytest.raises(CommandError, match="1 invalid row"):
        call_command("import_transactions", str(path), "--no-progress")
    assert "line 3: type:" in capsys.readouterr().err
    assert not Transaction.objects.exists()
    call_command("import_transactions", str(path), "--no-progress", "--skip-invalid")
    assert Transaction.objects.count() == 2


def test_batch_work_binds_client_side_and_prepares_nothing_then_restores_the_connection(db):
    """Imports and jobs run their statements many times with arrays of very different sizes: prepared, PostgreSQL
    may plan them for a guessed size (core.db.batch_statements)."""
    from django.db import connection

    from core.db import batch_statements

    connection.ensure_connection()
    factory, threshold = connection.connection.cursor_factory, connection.connection.prepare_threshold
    with batch_statements(), connection.cursor() as cursor:
        assert type(cursor.cursor).__name__ == "Cursor"  # Django's client-side binding cursor
        assert connection.connection.prepare_threshold is None
    assert (connection.connection.cursor_factory, connection.connection.prepare_threshold) == (factory, threshold)
    assert threshold == 5  # the hot paths' statements are prepared


@pytest.mark.django_db(transaction=True)
def test_batch_work_in_several_threads_at_once_restores_each_threads_connection():
    # given: a function run as batch work, entered by two threads at once
    from core.db import batch_statements

    barrier, seen = threading.Barrier(2), []

    @batch_statements()
    def batch_work():
        barrier.wait(timeout=10)  # both inside at once
        seen.append(connection.connection.prepare_threshold)
        barrier.wait(timeout=10)

    def run():
        try:
            connection.ensure_connection()
            before = connection.connection.prepare_threshold
            batch_work()
            seen.append((before, connection.connection.prepare_threshold))
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # then: batch mode inside, and each thread's own connection restored afterwards
    assert seen[:2] == [None, None]
    assert seen[2:] == [(5, 5), (5, 5)]


@pytest.mark.django_db(transaction=True)
def test_imports_of_overlapping_files_wait_for_each_other_instead_of_deadlocking(program, tmp_path):
    # given: another import of the same three purchases has written K1 and not committed yet
    member = MemberFactory()
    at = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [_row(f"K{i}", member, "10.00", at) for i in (1, 2, 3)]
    other = connection.get_new_connection(connection.get_connection_params())

    def other_writes(key):
        other.execute(
            "INSERT INTO loyalty_transaction (program_id, store, external_id, channel, member_id, kind, occurred_at, "
            "currency, total, lines, points, breakdown, returned_total, points_reversed, paid_with_points, created_at) "
            "VALUES (%s, 'S1', %s, 'pos', %s, 'purchase', %s, 'SEK', 10, '[]', 0, '[]', 0, 0, 0, now())",
            [program.pk, key, member.pk, at],
        )

    other_writes("K1")
    outcome = {}

    def import_reversed():
        try:
            outcome["report"] = _import(program, _csv(tmp_path, rows[::-1]), batch_size=10)
        except Exception as exc:  # asserted below
            outcome["error"] = exc
        finally:
            connection.close()

    # when: this import of the file in the opposite order starts, waits on K1, and the other import goes on
    worker = threading.Thread(target=import_reversed)
    worker.start()
    assert until_someone_waits_on_a_lock(), "the import did not wait for the uncommitted K1"
    other_writes("K3")  # in file order the import would hold K3 by now, and this would deadlock
    other_writes("K2")
    other.commit()
    other.close()
    worker.join(timeout=30)
    # then: no deadlock; each purchase recorded once, by the import that came first
    assert "error" not in outcome, outcome.get("error")
    assert (outcome["report"].imported, outcome["report"].already_present) == (0, 3)
    assert sorted(Transaction.objects.values_list("external_id", flat=True)) == ["K1", "K2", "K3"]


@pytest.mark.parametrize("seed", range(5))
def test_a_chunks_purchases_are_written_in_the_order_of_their_keys_as_pairs(seed):
    # given: purchases whose stores are prefixes of each other, share their first characters, or are not ASCII
    rng = random.Random(seed)
    texts = ["", "S", "S1", "S10", "S1\t", "S2", "Å", "Ö1", "𝔖", "a b", "S1x"]
    keys = list({(rng.choice(texts[1:]), rng.choice(texts)) for _ in range(300)})
    rng.shuffle(keys)
    purchases = [(0, key, "", None, f"row{i}") for i, key in enumerate(keys)]
    # when
    text = writing_module._purchases_text(SimpleNamespace(pk=1), purchases, list(range(len(keys))), timezone.now())
    # then: in the order of (store, external_id) as pairs, which is PostgreSQL's COLLATE "C" order of the fallback
    written = [keys[int(line.split("\t", 1)[0])] for line in text.splitlines()]
    assert written == sorted(keys)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_imported_purchases_and_returns_count_for_tiers_as_recorded_ones_do(program, tmp_path, batch_size):
    # given: a ladder on points, and members who cross it in the file, one of them back down by a return
    from loyalty.tier_models import TierChange, TierCounter, TierStatus
    from loyalty.tier_setup import tier_create

    for rank, (code, threshold) in enumerate([("base", 0), ("silver", 100), ("gold", 300)]):
        tier_create(program=program, code=code, name_en=code, rank=rank, threshold=Decimal(threshold))
    program.refresh_from_db()
    members = [MemberFactory(timezone=tz) for tz in ("Europe/Stockholm", "America/New_York", "Asia/Tokyo")]
    at = (timezone.now() - timedelta(days=40)).replace(hour=23, minute=30, second=0, microsecond=0)
    rows = [
        _row("P1", members[0], 80, at),
        _row("P2", members[0], 250, at + timedelta(days=1)),
        _row("P3", members[1], 120, at + timedelta(days=2)),
        _row("P4", None, 500, at + timedelta(days=2)),
        _row("R1", None, 120, at + timedelta(days=3), type="return", original_external_id="P3"),
        _row("P5", members[2], 99, at + timedelta(days=30)),
        _row("P6", members[1], 40, at + timedelta(days=31)),
    ]

    def tier_state():
        return (
            sorted(TierCounter.objects.values_list("member_id", "period", "points", "spend_cents", "purchases")),
            sorted(TierStatus.objects.values_list("member_id", "tier__code")),
            sorted(TierChange.objects.values_list("member_id", "from_tier__code", "to_tier__code", "reason")),
        )

    with transaction.atomic():
        _record_per_row(program, rows, members)
        counters, statuses, history = tier_state()
        transaction.set_rollback(True)
    # when
    _import(program, _csv(tmp_path, rows), batch_size=batch_size)
    # then: the same counters and tiers; with several purchases to a chunk, a member who crosses two thresholds in
    # one chunk moves up once, straight to the higher tier
    imported = tier_state()
    assert (imported[0], imported[1]) == (counters, statuses)
    assert statuses == [(members[0].pk, "gold"), (members[1].pk, "silver")]  # a return keeps the tier till review
    if batch_size == 1:
        assert imported[2] == history
    else:
        assert imported[2] == [(members[0].pk, "base", "gold", "upgrade"), (members[1].pk, "base", "silver", "upgrade")]
    assert ledger_verify() == []


def _sorted_state():
    """_ledger_state with entries and lots in order of their business keys: lanes interleave their row ids."""
    state = _ledger_state()
    return {name: sorted(rows, key=repr) for name, rows in state.items()}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("writers", [2, 3])
def test_an_import_in_lanes_makes_the_ledger_of_the_per_row_path(program, tmp_path, writers):
    # given: purchases of several members and anonymous ones, returns of purchases in the file (without a member
    # named, so their lane is their purchase's) and of one recorded before
    members = [MemberFactory() for _ in range(6)]
    start = (timezone.now() - timedelta(days=120)).replace(hour=9, minute=30, second=0, microsecond=0)
    _record_per_row(program, [_row("OLD", members[0], "80.00", start - timedelta(days=1))], members)
    rows = _purchases(members, 90, start)
    rows += [
        _row(f"R{i}", None, "5.00", start + timedelta(days=100), type="return", original_external_id=f"T{i}")
        for i in (1, 2, 3, 8, 9, 10)
    ]
    rows.append(_row("R-OLD", None, "80.00", start, type="return", original_external_id="OLD"))
    with transaction.atomic():
        _record_per_row(program, rows, members)
        expected = _sorted_state()
        transaction.set_rollback(True)
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=7, writers=writers)
    # then
    assert _sorted_state() == expected
    assert (report.read, report.imported, report.invalid) == (len(rows), len(rows), 0)
    assert report.points_credited == sum(e[2] for e in expected["entries"] if e[1] == "earn") - 80
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_a_lane_that_fails_stops_the_import_and_a_rerun_imports_the_rest(program, tmp_path):
    # given: a file whose third return of a purchase exceeds it, found only when it is written
    members = [MemberFactory() for _ in range(4)]
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = _purchases(members, 40, at)
    rows += [
        _row(f"R{n}", None, "6.00", at + timedelta(days=1 + n), type="return", original_external_id="T1")
        for n in range(3)
    ]  # T1 cost 15.50: the third return would take 18.00
    path = _csv(tmp_path, rows)
    # when
    with pytest.raises(ImportAborted) as stopped:
        _import(program, path, batch_size=5, writers=2)
    rerun = _import(program, path, batch_size=5, writers=2, skip_invalid=True)
    # then: the import stopped at the return; the rerun imported all but it, and reported it
    assert stopped.value.extra["line"] == len(rows) + 1  # the last row; the header is line 1
    assert [(e.line, e.field) for e in rerun.errors] == [(len(rows) + 1, "total")]
    assert Transaction.objects.count() == len(rows) - 1
    assert ledger_verify() == []


def test_a_chunk_that_fails_after_opening_its_new_accounts_leaves_none_of_them(program, tmp_path, monkeypatch):
    # given: two members without accounts, and the chunk's entries failing to be written, after the chunk has
    # opened their accounts with their balances
    from loyalty.ledger import bulk

    members = [MemberFactory(), MemberFactory()]
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    path = _csv(tmp_path, [_row(f"T{i}", member, "10.00", at) for i, member in enumerate(members)])
    opened = []

    def fail_after_the_accounts(*models):
        opened.extend(Account.objects.filter(pk__in=[m.pk for m in members]).values_list("pk", flat=True))
        raise RuntimeError("the entries cannot be written")

    monkeypatch.setattr(bulk, "references_checked", fail_after_the_accounts)
    # when
    with pytest.raises(Exception, match="the entries cannot be written"):
        _import(program, path, writers=1)
    # then: the accounts had been opened, and went with the chunk: no account, transaction or entry is left
    assert sorted(opened) == sorted(m.pk for m in members)
    assert not Account.objects.exists()
    assert not Transaction.objects.exists()
    assert not Entry.objects.exists()
    monkeypatch.undo()
    assert _import(program, path, writers=1).imported == 2  # and a rerun imports the file
    assert ledger_verify() == []


def test_an_external_id_of_several_members_imports_in_one_lane(program, tmp_path, monkeypatch):
    # given: two stores' purchases under one external id, of two members, and a return naming its store
    from loyalty.imports import service

    monkeypatch.setattr(service, "_write_in_lanes", lambda *a: pytest.fail("written in lanes"))
    first, second = MemberFactory(), MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = [
        _row("SAME", first, "10.00", at),
        {**_row("SAME", second, "20.00", at), "store": "S2"},
        _row("R", None, "10.00", at + timedelta(days=1), type="return", original_external_id="SAME"),
    ]
    # when
    report = _import(program, _csv(tmp_path, rows), writers=2)
    # then
    assert report.imported == 3


# --- lanes that must write as one lane would (third audit) ------------------------------------------------------


def _lane_of(member, lanes=2) -> int:
    from loyalty.imports.service import lane_of

    return lane_of(member.member_number, lanes)


def _members_in_lanes(*lanes, **fields) -> list:
    """A member in each of the given lanes (of two)."""
    found = []
    for lane in lanes:
        while _lane_of(member := MemberFactory(**fields)) != lane:
            pass
        found.append(member)
    return found


def _lane_behind(monkeypatch, behind):
    """The chunks holding a row `behind` picks are written 1.5 s late: their lane is behind the other, as in any
    large file."""
    from loyalty.imports import service

    write = service.chunk_write

    def late(*, chunk, **kwargs):
        # A purchase is (line, (store, external_id), member number, ...): Earnings.ready
        purchases = [SimpleNamespace(external_id=p[1][1], member=p[2]) for p in chunk.purchases]
        if any(behind(p) for p in purchases) or any(behind(r) for r in chunk.returns):
            time.sleep(1.5)
        return write(chunk=chunk, **kwargs)

    monkeypatch.setattr(service, "chunk_write", late)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("writers", [1, 2])
def test_a_return_that_undoes_a_referral_is_written_after_the_referrers_rows_before_it(
    program, tmp_path, monkeypatch, writers
):
    # given: a referrer who spent their referral reward, earns 100 in the file, and then loses the reward to a
    # return of the referee's purchase; under available_only, what the return can take depends on that order
    program.referrals_enabled, program.referral_referrer_points, program.return_policy = True, 50, "available_only"
    program.save()
    (referrer,) = _members_in_lanes(0)
    (referee,) = _members_in_lanes(1, referral_code=referrer.referral_code)
    at = timezone.now() - timedelta(days=10)
    _record_per_row(program, [_row("P1", referee, "100.00", at)], [referee])
    points_adjust(member=referrer, points=-50, reason="spent")
    rows = [
        _row("RP", referrer, "100.00", at + timedelta(days=1)),
        _row("RET", referee, "100.00", at + timedelta(days=2), type="return", original_external_id="P1"),
    ]
    _lane_behind(monkeypatch, lambda row: row.member == referrer.member_number)
    # when
    _import(program, _csv(tmp_path, rows), writers=writers)
    # then: the return took the reward back from the 100 earned before it
    assert Account.objects.get(pk=referrer.pk).available == 50
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("writers", [1, 2])
def test_a_return_under_another_rows_store_and_external_id_is_refused_as_in_one_lane(
    program, tmp_path, monkeypatch, writers
):
    # given: a purchase S1/K1 of one member, and a return of another member's purchase sent as S1/K1 too
    first, second = _members_in_lanes(0, 1)
    at = timezone.now() - timedelta(days=10)
    rows = [
        _row("K1", first, "40.00", at),
        _row("P9", second, "30.00", at),
        _row("K1", second, "10.00", at + timedelta(days=1), type="return", original_external_id="P9"),
    ]
    _lane_behind(monkeypatch, lambda row: row.member == first.member_number)
    # when
    report = _import(program, _csv(tmp_path, rows), writers=writers, skip_invalid=True)
    # then: the purchase, first in the file, is recorded; the return is refused and reported
    assert Transaction.objects.get(external_id="K1").member_id == first.pk
    assert [error.line for error in report.errors] == [4]
    assert Account.objects.get(pk=first.pk).available == 40


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("writers", [1, 2])
def test_a_return_of_a_recorded_purchase_under_an_external_id_in_the_file_is_written_in_its_order(
    program, tmp_path, monkeypatch, writers
):
    # given: a member's recorded purchase S2/T1, spent; the file holds another member's purchase S1/T1, then the
    # first member earns 100 and returns S2/T1 whole
    program.return_policy = "available_only"
    program.save()
    first, second = _members_in_lanes(0, 1)
    at = timezone.now() - timedelta(days=10)
    _record_per_row(program, [{**_row("T1", second, "100.00", at), "store": "S2"}], [second])
    points_adjust(member=second, points=-100, reason="spent")
    rows = [
        {**_row("T1", first, "50.00", at + timedelta(days=1)), "original_store": ""},
        {**_row("X", second, "100.00", at + timedelta(days=1)), "original_store": ""},
        {
            **_row("R", second, "100.00", at + timedelta(days=2), type="return", original_external_id="T1"),
            "store": "S2",
            "original_store": "S2",
        },
    ]
    path = tmp_path / "tx.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, "original_store"])
        writer.writeheader()
        writer.writerows(rows)
    _lane_behind(monkeypatch, lambda row: row.external_id == "X")
    # when
    _import(program, path, writers=writers)
    # then: the return took back the 100 earned before it
    assert Account.objects.get(pk=second.pk).available == 0
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("writers", [1, 2])
def test_a_stopped_import_names_the_row_it_stopped_at_the_earliest_of_its_lanes(program, tmp_path, writers):
    # given: two members' returns of more than they bought, at lines 4 and 5, in different lanes
    first, second = _members_in_lanes(0, 1)
    at = timezone.now() - timedelta(days=10)
    rows = [
        _row("PB", second, "10.00", at),
        _row("PA", first, "10.00", at),
        _row("RB", second, "20.00", at + timedelta(days=1), type="return", original_external_id="PB"),
        _row("RA", first, "20.00", at + timedelta(days=1), type="return", original_external_id="PA"),
    ]
    # when
    with pytest.raises(ImportAborted) as stopped:
        _import(program, _csv(tmp_path, rows), writers=writers)
    # then: two lanes each stop at their member's return, and the earlier line is named; one lane meets the members
    # in the order of their numbers (service._spooled) and names the return it stopped at
    earlier_met = 5 if first.member_number < second.member_number else 4  # lines 5 and 4 are first's and second's
    assert stopped.value.extra["line"] == (4 if writers == 2 else earlier_met)
    # and each chunk that met a bad return is undone whole: here every chunk did
    assert not Transaction.objects.exists() and not Entry.objects.exists()
    assert ledger_verify() == []


def test_rows_read_ahead_are_written_by_member_each_members_in_file_order(program, tmp_path, monkeypatch):
    # given: four members' purchases taking turns, 32 rows, in chunks of 4
    from loyalty.imports import service

    members = [MemberFactory() for _ in range(4)]
    at = timezone.now() - timedelta(days=10)
    rows = [_row(f"T{i:02d}", members[i % 4], "10.00", at + timedelta(minutes=i)) for i in range(32)]
    chunks, write = [], service.chunk_write

    def spied(*, chunk, **kwargs):
        chunks.append([(p[2], p[1][1]) for p in chunk.purchases])  # (member number, external id)
        return write(chunk=chunk, **kwargs)

    monkeypatch.setattr(service, "chunk_write", spied)
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=4, writers=1)
    # then: every row once, each member's in file order, and a chunk holds fewer members than in file order, where
    # each of its 8 chunks would hold all four
    assert report.imported == 32 and all(len(chunk) <= 4 for chunk in chunks)
    written = [row for chunk in chunks for row in chunk]
    assert sorted(written) == sorted((r["member"], r["external_id"]) for r in rows)
    for member in members:
        assert [t for m, t in written if m == member.member_number] == [
            r["external_id"] for r in rows if r["member"] == member.member_number
        ]
    assert sum(len({m for m, _ in chunk}) for chunk in chunks) <= 12
    assert ledger_verify() == []


def test_members_who_buy_return_and_buy_again_share_chunks(program, tmp_path, monkeypatch):
    # given: 60 members who each buy, return part of it and buy again, in chunks of 100
    from loyalty.imports import service

    members = [MemberFactory() for _ in range(60)]
    at = timezone.now() - timedelta(days=10)
    rows = [_row(f"A{i}", m, "100.00", at) for i, m in enumerate(members)]
    rows += [
        _row(f"R{i}", m, "10.00", at + timedelta(hours=1), type="return", original_external_id=f"A{i}")
        for i, m in enumerate(members)
    ]
    rows += [_row(f"B{i}", m, "50.00", at + timedelta(hours=2)) for i, m in enumerate(members)]
    chunks, write = [], service.chunk_write

    def spied(*, chunk, **kwargs):
        chunks.append(chunk.size)
        return write(chunk=chunk, **kwargs)

    monkeypatch.setattr(service, "chunk_write", spied)
    # when
    report = _import(program, _csv(tmp_path, rows), batch_size=100, writers=1)
    # then: each second purchase waits for a chunk after its member's return, all of them together (the rows in
    # file order would take 2 chunks; one cut per member, 60)
    assert (report.imported, report.errors) == (180, [])
    assert len(chunks) <= 3
    assert [a.available for a in Account.objects.order_by("pk")] == [140] * 60
    assert ledger_verify() == []


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("batch_size", "lanes", "owners_known"), [(1, 1, True), (7, 3, True), (500, 1, True), (7, 1, False)]
)
def test_chunks_hold_every_row_once_and_each_members_in_file_order(seed, batch_size, lanes, owners_known):
    # given: 6,000 rows of 300 members, a fifth of them returns of an earlier purchase of the same member, spooled
    # as the check spools them
    from loyalty.imports import service
    from loyalty.imports.checking import Checked, spool_write
    from loyalty.imports.rows import Row

    rng, checked, items, bought = random.Random(seed), Checked(), [], {}
    for line in range(2, 6002):
        member = f"M{rng.randrange(300):03d}"
        if bought.get(member) and rng.random() < 0.2:
            at = datetime(2026, 1, 1, tzinfo=UTC)
            original = rng.choice(bought[member])
            items.append(Row(line, "S", f"R{line}", "pos", member, "return", original, "", at, Decimal(1), []))
        else:
            items.append((line, ("S", f"P{line}"), member, 1, "", 5, "", "", True, None))  # as Earnings.ready
            checked.own(f"P{line}", member)
            bought.setdefault(member, []).append(f"P{line}")
    if not owners_known:
        checked.owners, lanes = None, 1
    spool = tempfile.TemporaryFile()
    for start in range(0, len(items), 997):
        part = items[start : start + 997]
        spool_write(spool, part, all(type(item) is tuple for item in part))
    # when
    chunks = [chunk for _, chunk in service._spooled([spool], checked, batch_size, lanes)]
    # then: each row once; each member's rows in file order as the ledger takes them (a chunk's purchases, then its
    # returns); in file order throughout where owners are not known
    line_of = itemgetter(0)  # a purchase's line; a Row's too
    written = [[line_of(item) for item in (*chunk.purchases, *chunk.returns)] for chunk in chunks]
    assert all(0 < len(lines) <= batch_size for lines in written)
    assert sorted(line for lines in written for line in lines) == [line_of(item) for item in items]
    member_of = {line_of(item): item[2] if type(item) is tuple else item.member for item in items}
    for member in bought:
        lines = [line for chunk in written for line in chunk if member_of[line] == member]
        assert lines == sorted(lines), member
    if not owners_known:
        assert [line for chunk in written for line in sorted(chunk)] == [line_of(item) for item in items]
