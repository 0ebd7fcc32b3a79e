"""The import's check pass (loyalty/imports/checking.py, rows.py) finds what a plain reading of every row would: parts
checked apart and handed over pickled, spools, the quick path for plain rows, the members it keeps once found."""

import itertools
import marshal
import pickle
import random
import tempfile
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from loyalty.imports import checking as checking_module
from loyalty.imports.checking import Checked, _check, spool_read, spool_write
from loyalty.imports.files import COLUMNS
from loyalty.imports.report import ImportReport
from loyalty.imports.rows import RowInvalid, RowParser
from loyalty.imports.writing import Earnings
from members.models import Member
from members.numbers import luhn_check_digit
from tests.factories import MemberFactory
from tests.test_import import _csv, _import, _row

pytestmark = pytest.mark.django_db(transaction=False)

_AT = datetime(2025, 5, 1, 12, tzinfo=UTC)


def _checked(program, rows, batch_size=1000) -> Checked:
    with tempfile.TemporaryFile() as spool:
        now = timezone.now()
        parser, earnings = RowParser(program, now), Earnings(program, now)
        return _check(parser, rows, batch_size, ImportReport(), lambda *a: None, earnings, spool)


def _handed(checked: Checked) -> Checked:
    return pickle.loads(pickle.dumps(checked, pickle.HIGHEST_PROTOCOL))


def _random_rows(rng, numbers, n):
    ids, stores = ["P1", "P2", "Ré€"], ["S1", "Sø"]
    rows = []
    for line in range(1, n + 1):
        external_id, store = rng.choice(ids + ["R1", "R2"]), rng.choice(stores)
        if rng.random() < 0.6:
            row = {**_row(external_id, None, rng.choice(["10.00", "10.00", "-1.00"]), _AT), "store": store}
            # mostly one owner per external id, so that owners are not lost at once
            row["member"] = (
                numbers[ids.index(external_id)] if external_id in ids and rng.random() < 0.8 else rng.choice(numbers)
            )
        else:
            original = rng.choice(ids + ["NONE"])
            row = {**_row(external_id, None, "1.00", _AT, type="return", original_external_id=original), "store": store}
            if rng.random() < 0.5:
                row["original_store"] = rng.choice(stores)
        rows.append((line, row))
    return rows


def test_parts_merged_after_pickling_are_what_one_check_finds_randomized(program):
    # given: an active, a second active, a suspended and an unknown member, and anonymous rows
    members = [MemberFactory(), MemberFactory(), MemberFactory(status=Member.Status.SUSPENDED)]
    unknown = "123456789" + luhn_check_digit("123456789")
    numbers = [m.member_number for m in members] + [unknown, ""]
    rng = random.Random(20250501)
    lost = 0
    for _ in range(150):
        rows = _random_rows(rng, numbers, rng.randint(0, 7))
        for batch_size in (1, 2, 1000):
            whole = _checked(program, rows, batch_size)
            lost += whole.owners is None
            assert _handed(whole) == whole
            cuts = [(c,) for c in range(len(rows) + 1)]
            cuts += list(itertools.combinations_with_replacement(range(len(rows) + 1), 2))
            for cut in cuts:
                bounds = [0, *cut, len(rows)]
                parts = [_checked(program, rows[a:b], batch_size) for a, b in itertools.pairwise(bounds)]
                merged = parts[0]
                for later in parts[1:]:
                    handed = _handed(later)
                    assert handed == later and list(handed.purchase_keys) == list(later.purchase_keys)
                    merged.then(handed)
                assert merged == whole, (rows, cut, batch_size)
                assert list(merged.purchase_keys) == list(whole.purchase_keys)
                assert (merged.owners is None) or list(merged.owners) == list(whole.owners)
    assert 0.2 < lost / 450 < 0.8, lost  # both outcomes exercised


@pytest.mark.parametrize(
    "state",
    [
        Checked(),
        Checked(owners=None),
        Checked(owners=None, purchases_seen={"a", "é"}, purchase_keys={("S", "a"): None, ("Sé", "é"): None}),
        Checked(owners={"a": "1", "r": "r"}, purchases_seen={"a"}),  # recorded purchases' owners (_returns_check)
        Checked(owners={"a": "1"}, purchases_seen={"a", "b"}),
        Checked(owners={"é€😀": ""}, purchases_seen={"é€😀"}, purchase_keys={("", "é€😀"): None}),
        Checked(bad={1, 2}, return_keys={("S", "R")}),
    ],
)
def test_a_checked_pickles_whole(state):
    handed = _handed(state)
    assert handed == state
    assert list(handed.purchase_keys) == list(state.purchase_keys)
    assert handed.owners is None or list(handed.owners) == list(state.owners)


def test_spools_of_odd_values_read_back_whole():
    ready = [
        (1, ("Sé€", "😀"), "", None, "a\tb", 0, "2025-05-01 12:00:00+00:00", "", False, None),
        (2, ("", "x\ud800"), "1234567897", 2**62, "", 10**30, "", "d", True, "e"),
        ({1, "a"}, frozenset({"é"}), -(2**70), 1.5, b"\x00"),
    ]
    with tempfile.TemporaryFile() as spool:
        spool_write(spool, ready, True)
        (back,) = spool_read(spool)
    assert back == ready
    assert [type(v) for v in back[0]] == [type(v) for v in ready[0]]
    assert marshal.loads(marshal.dumps(ready, checking_module._MARSHAL_VERSION)) == ready


def _valid(payload):
    return payload + luhn_check_digit(payload)


def test_the_quick_path_accepts_what_the_field_checks_accept_fuzzed(program):
    rng = random.Random(7)
    number = _valid("123456789")
    members = [
        "",
        " ",
        "\t",
        "\u00a0",
        number,
        f" {number} ",
        f"{number}\n",
        f"\u00a0{number}",
        number[:-1] + "0",
        "".join(chr(0x660 + int(d)) for d in number),
        "１２３４５６７８９７",
        None,
        0,
    ]
    totals = [
        "10",
        "10.5",
        "10.50",
        " 10 ",
        "0.00",
        "-0",
        "-0.00",
        "1e2",
        "10.",
        ".5",
        "+10",
        "10.505",
        "",
        "١٠",
        "\u00a010",
        "9999999999.99",
        "10000000000",
        "1_0",
        "NaN",
        10,
        10.5,
        None,
    ]
    ats = [
        "2025-05-01T12:00:00+00:00",
        "2025-05-01 12:00:00+00:00",
        "2025-05-01T12:00:00Z",
        "2025-05-01T12:00:00",
        "2025-05-01T14:00:00+02:00",
        "2025-05-01T12:00:00.5+00:00",
        " 2025-05-01T12:00:00+00:00",
        "x",
        "",
    ]
    texts = ["S1", " S1 ", "", " ", "é€", "S" * 64, "S" * 65, " " + "S" * 64, None, 5]
    parser = RowParser(program, datetime(2025, 6, 1, tzinfo=UTC))
    accepted = {"quick": 0, "checked": 0}
    for _ in range(20000):
        odd = {
            "store": texts,
            "external_id": texts,
            "channel": ["pos", " pos", "web", "x", None],
            "member": members,
            "type": ["purchase", "return", "Return", None],
            "original_external_id": ["", " ", "P1", " P1 ", None],
            "original_store": ["", " ", "S1", None],
            "occurred_at": ats,
            "currency": ["SEK", "sek", None],
            "total": totals,
            "lines": [None, "", [], "[]", "x"],
        }
        raw = {**_row("P1", None, "10.00", _AT), "member": number}
        for name in rng.sample(sorted(odd), rng.randint(1, 3)):
            raw[name] = rng.choice(odd[name])
        for name in [k for k in raw if rng.random() < 0.02]:
            del raw[name]
        quick = parser._parse_plain(1, tuple(map(raw.get, COLUMNS)))
        try:
            checked = parser._parse_checked(1, raw)
        except RowInvalid:
            checked = None
        accepted["quick"] += quick is not None
        accepted["checked"] += checked is not None
        if quick is not None:
            assert checked is not None, raw
            assert quick.occurred_text in ("", quick.occurred_at.isoformat(" ")), raw
            assert quick._replace(occurred_text="") == checked, raw
            assert type(quick.member) is str and quick.member == quick.member.strip()
    assert accepted["quick"] > 5000, accepted


def test_a_purchase_text_writes_its_own_total_whatever_came_before(program):
    # Earnings.points keeps a total's text by its value, and Decimal("-0.00") == Decimal("0.00")
    member = MemberFactory()
    for totals in (("0.00", "-0.00"), ("-0.00", "0.00")):
        earnings, parser = Earnings(program, timezone.now()), RowParser(program, timezone.now())
        for total in totals:
            row = parser.parse(1, _row("P1", member, total, timezone.now() - timedelta(days=1)))
            assert earnings.ready(row, member.pk)[4].split("\t")[6] == f"{row.total}", totals


@pytest.mark.parametrize(("pending_days", "expiry_months"), [(0, 24), (3, 1), (30, 0)])
def test_a_days_lot_dates_are_those_a_first_look_at_the_day_gives_randomized(program, pending_days, expiry_months):
    # Earnings.lot keeps, for a day in UTC, its dates as text and whether its points have matured and expired; days
    # whose times fall on both sides of the import's start are worked out time by time
    program.pending_days, program.expiry_months = pending_days, expiry_months
    now = timezone.now()
    rng = random.Random(7)
    seen = Earnings(program, now)
    for _ in range(2000):
        at = (now - timedelta(days=rng.randrange(0, 800), seconds=rng.randrange(86400))).replace(microsecond=0)
        text = at.isoformat(" ")
        assert seen.lot(at, text) == Earnings(program, now).lot(at, text), text
    assert seen.utc_days  # the cache was used


def test_a_member_number_of_other_digits_is_a_row_error(program, tmp_path):
    # "²".isdigit() is True, but int("²") raises
    rows = [
        {**_row("P1", None, "10.00", _AT), "member": "²" * 10},
        {**_row("P2", None, "10.00", _AT), "member": "١٢٣٤٥٦٧٨٩7"},
    ]
    report = _import(program, _csv(tmp_path, rows), skip_invalid=True)
    assert [(e.line, e.field) for e in report.errors] == [(2, "member"), (3, "member")]


def test_a_member_reactivated_between_chunks_is_accepted_in_later_chunks(program, monkeypatch):
    # given: a member suspended when the first chunk is checked, active again before the second is
    member = MemberFactory(status=Member.Status.SUSPENDED)
    resolve = checking_module.members_resolve

    def reactivating(program, numbers):
        found = resolve(program, numbers)
        Member.objects.filter(pk=member.pk).update(status=Member.Status.ACTIVE)
        return found

    monkeypatch.setattr(checking_module, "members_resolve", reactivating)
    rows = [(line, _row(f"T{line}", member, "10.00", _AT)) for line in (1, 2)]
    # when
    checked = _checked(program, rows, batch_size=1)
    # then: the second chunk looks the member up again, and takes row 2
    assert checked.bad == {1}


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_the_spool_holds_every_good_row_once_in_file_order_randomized(program, batch_size):
    # given: purchases of members found in an earlier chunk or not yet, of suspended and unknown members, of no
    # member, too large for a transaction, with bad totals, and returns of earlier purchases
    active = [MemberFactory() for _ in range(6)]
    suspended = MemberFactory(status=Member.Status.SUSPENDED)
    unknown = "1234567897"  # a valid number of no member
    rng, rows, bought = random.Random(batch_size), [], []
    for line in range(1, 301):
        pick = rng.random()
        member = rng.choice(active)
        if pick < 0.1 and bought:
            original = rng.choice(bought)
            row = {**_row(f"R{line}", member, "1.00", _AT), "type": "return", "original_external_id": original}
        elif pick < 0.15:
            row = _row(f"P{line}", suspended, "5.00", _AT)
        elif pick < 0.2:
            row = {**_row(f"P{line}", None, "5.00", _AT), "member": unknown}
        elif pick < 0.25:
            row = _row(f"P{line}", None, "5.00", _AT)
        elif pick < 0.3:
            row = _row(f"P{line}", member, "9999999999.99", _AT)
        elif pick < 0.33:
            row = _row(f"P{line}", member, "-1", _AT)
        else:
            row = _row(f"P{line}", member, f"{rng.randrange(1, 500)}.00", _AT)
            bought.append(f"P{line}")
        rows.append((line, row))
    # when
    with tempfile.TemporaryFile() as spool:
        now = timezone.now()
        report = ImportReport()
        checked = _check(
            RowParser(program, now), rows, batch_size, report, lambda *a: None, Earnings(program, now), spool
        )
        spooled = [item for chunk in spool_read(spool) for item in chunk]
    # then: each good row once, in file order, purchases made ready and returns as rows; each bad row named once
    lines = [item[0] if type(item) is tuple else item.line for item in spooled]
    assert lines == [line for line, _ in rows if line not in checked.bad]
    assert all((type(item) is tuple) == (rows[item_line - 1][1]["type"] == "purchase") for item, item_line in
               zip(spooled, lines, strict=True))  # fmt: skip
    assert sorted(error.line for error in report.errors) == sorted(checked.bad)
    assert {error.field for error in report.errors} == {"member", "total"}
    assert 40 < len(checked.bad) < 150
