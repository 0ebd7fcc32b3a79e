"""A large import file checked in parts, each in its own process at once (loyalty/imports/checking.py): the same
rows, errors, line numbers and ledger as checked in one."""

import os
import pickle
import signal
import tempfile
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from loyalty.imports import ImportFileInvalid, TransactionFile
from loyalty.imports import checking as checking_module
from loyalty.imports.checking import Checked, _check
from loyalty.imports.files import PartMisjudged
from loyalty.imports.report import ImportReport
from loyalty.imports.rows import RowParser
from loyalty.imports.writing import Earnings
from loyalty.models import Transaction
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory
from tests.test_import import _csv, _import, _jsonl, _purchases, _record_per_row, _row, _sorted_state

pytestmark = pytest.mark.django_db(transaction=True)  # the parts' processes must see the test's members


@pytest.fixture
def in_parts(monkeypatch, settings):
    """Any file checked in parts; the outcome of each attempt at it (the spools' number, or None: checked again)."""
    monkeypatch.setattr(checking_module, "PARTS_FROM_BYTES", 0)
    outcomes = []
    parts_check = checking_module.parts_check

    def spied(*args):
        found = parts_check(*args)
        outcomes.append(None if found is None else len(found[1]))
        return found

    monkeypatch.setattr(checking_module, "parts_check", spied)
    return outcomes


def _no_children_left():
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def _rows(members, start):
    """Purchases, good and bad, across the file; returns of purchases earlier in the file (in another part, once cut),
    one of a purchase recorded before, one of no purchase; stores with a line end in them (a quoted CSV field over
    two lines)."""
    rows = _purchases(members, 120, start)
    for i in range(0, 120, 17):
        rows[i] = {**rows[i], "store": "S\n2"}
    for i in (5, 50, 100):
        rows[i] = {**rows[i], "total": "-1.00"}
    rows += [
        _row(f"R{i}", None, "5.00", start + timedelta(days=100), type="return", original_external_id=f"T{i}")
        for i in (1, 2, 3, 90)
    ]
    rows.append(_row("R-OLD", None, "80.00", start, type="return", original_external_id="OLD"))
    rows.append(_row("R-NONE", None, "1.00", start, type="return", original_external_id="NONE"))
    rows += _purchases(members, 60, start + timedelta(days=1))[::-1]  # again: already in the file
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("processes", [2, 3])
def test_a_file_checked_in_parts_imports_as_checked_in_one(program, tmp_path, settings, in_parts, fmt, processes):
    # given: a file with bad rows in every part, checked and imported in one process first, then undone
    members = [MemberFactory() for _ in range(6)]
    start = (timezone.now() - timedelta(days=120)).replace(hour=9, minute=30, second=0, microsecond=0)
    _record_per_row(program, [_row("OLD", members[0], "80.00", start - timedelta(days=1))], members)
    rows = _rows(members, start)
    path = _csv(tmp_path, rows) if fmt == "csv" else _jsonl(tmp_path, rows)
    settings.IMPORT_CHECKERS = processes
    with transaction.atomic():  # inside a database transaction: checked in one process
        expected = _import(program, path, batch_size=7, skip_invalid=True)
        expected_state = _sorted_state()
        transaction.set_rollback(True)
    assert in_parts == []
    heard = []
    # when
    report = _import(program, path, batch_size=7, skip_invalid=True, progress=lambda stage, n: heard.append((stage, n)))
    # then: checked in as many parts, with the same errors at the same lines, and the same ledger
    assert in_parts == [processes]
    assert report.errors == expected.errors
    assert [e.line for e in report.errors][:3] == ([8, 55, 108] if fmt == "csv" else [6, 51, 101])
    assert (report.read, report.imported, report.already_present, report.invalid) == (
        expected.read,
        expected.imported,
        expected.already_present,
        expected.invalid,
    )
    assert report.invalid == 4
    assert sum(n for stage, n in heard if stage == "check") == len(rows)
    assert _sorted_state() == expected_state
    assert ledger_verify() == []
    _no_children_left()


def test_a_csv_file_cut_inside_a_quoted_field_is_checked_again_whole(program, tmp_path, settings, in_parts):
    # given: a stray quote inside an unquoted field near the top, which makes the quotes before each later line end
    # odd, until a quoted field over two lines just after the middle of the file: its line end looks like a cut
    members = [MemberFactory() for _ in range(3)]
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    rows = [_row(f"T{i}", members[i % 3], "10.00", at + timedelta(minutes=i)) for i in range(200)]
    rows[1] = {**rows[1], "external_id": 'T1"x'}
    rows[105] = {**rows[105], "store": "S\n3"}
    path = tmp_path / "tx.csv"
    text = _csv(tmp_path, rows).read_text().replace('"T1""x"', 'T1"x')  # as some tools write it: unquoted
    path.write_text(text)
    file = TransactionFile(path)
    first, _ = file.parts(2)
    with pytest.raises(PartMisjudged):
        list(first)
    settings.IMPORT_CHECKERS = 2
    heard = []
    # when
    report = _import(program, path, batch_size=10, progress=lambda stage, n: heard.append((stage, n)))
    # then: the cut was found out and the file checked whole, which read every row as it is, and told of each once
    assert in_parts == [None]
    assert (report.read, report.imported, report.invalid) == (200, 200, 0)
    assert sum(n for stage, n in heard if stage == "check") == 200
    assert Transaction.objects.filter(external_id='T1"x').exists()
    assert Transaction.objects.get(external_id="T105").store == "S\n3"
    _no_children_left()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_byte_that_is_not_utf8_in_a_later_part_refuses_the_file_and_names_the_byte(
    program, tmp_path, settings, in_parts, processes
):
    # given: a file of 64 kB or so whose last row holds a byte that is no UTF-8
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    path = _csv(tmp_path, [_row(f"T{i}", member, "10.00", at) for i in range(600)] + [_row("BAD", member, "1", at)])
    data = path.read_bytes().replace(b"BAD", b"B\xffD")
    path.write_bytes(data)
    settings.IMPORT_CHECKERS = processes
    # when
    with pytest.raises(ImportFileInvalid) as refused:
        _import(program, path)
    # then
    bad = data.index(b"\xff")
    assert f"invalid start byte at byte {bad})" in str(refused.value)
    assert not Transaction.objects.exists()
    _no_children_left()


class _NeedsCode(Exception):
    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code


def _fail():
    raise RuntimeError("the database went away")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _fail_beyond_unpickling():
    raise _NeedsCode("the real cause", code=7)


@pytest.mark.parametrize(
    "trouble, error",
    [
        (_fail, "the database went away"),
        (_die, "ended by signal 9, without a result"),
        (_fail_beyond_unpickling, "the real cause"),
    ],
    ids=["an error", "killed before it says anything", "an error that pickles but does not unpickle"],
)
def test_a_part_whose_process_fails_stops_the_import_names_why_and_writes_nothing(
    program, tmp_path, settings, in_parts, monkeypatch, trouble, error
):
    # given: the process checking the second part meets trouble when it looks its members up
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    parent, resolve = os.getpid(), checking_module.members_resolve

    def troubled(program, numbers):
        if os.getpid() != parent:
            trouble()
        return resolve(program, numbers)

    monkeypatch.setattr(checking_module, "members_resolve", troubled)
    settings.IMPORT_CHECKERS = 2
    # when
    with pytest.raises(RuntimeError, match=error):
        _import(program, _csv(tmp_path, [_row(f"T{i}", member, "10.00", at) for i in range(100)]))
    # then
    assert not Transaction.objects.exists()
    _no_children_left()


def _checked(program, rows) -> Checked:
    with tempfile.TemporaryFile() as spool:
        now = timezone.now()
        parser, earnings = RowParser(program, now), Earnings(program, now)
        return _check(parser, rows, 1000, ImportReport(), lambda *a: None, earnings, spool)


_AT = datetime(2025, 5, 1, 12, tzinfo=UTC)


def _p1(owner="first", store="S1", external_id="P1"):
    return lambda members: {**_row(external_id, members[owner], "10.00", _AT), "store": store}


def _return(external_id, original="P1", **fields):
    return lambda members: {
        **_row(external_id, None, "1.00", _AT, type="return", original_external_id=original),
        **fields,
    }


@pytest.mark.parametrize(
    "scenario",
    [
        [_return("R0"), _p1(), _p1(None, external_id="A1"), _return("R1"), _return("R2", original_store="S1")],
        [_p1(), _p1("second", store="S2"), _return("R3", original_store="S2")],
        [_p1(), _return("P1", original="A1")],
        [_return("Y"), _p1(external_id="Y")],
        [_p1(), _return("Z"), _return("Z")],
        [_p1(), _p1(None, external_id="A1"), _p1(), _p1(None, external_id="A1"), _p1("second", external_id="P2")],
    ],
    ids=[
        "returns before and after their purchases",
        "one external id, two members",
        "a return under a purchase's key",
        "a purchase under a return's key",
        "two returns under one key",
        "rows repeated",
    ],
)
def test_what_the_parts_found_taken_in_together_is_what_one_check_finds(program, scenario):
    # given: rows whose keys and owners meet across a cut
    members = {"first": MemberFactory(), "second": MemberFactory(), None: None}
    numbered = [(line, make(members)) for line, make in enumerate(scenario, start=1)]
    for cut in range(len(numbered) + 1):
        # when: the later part handed over as a part's process hands it over
        later = _checked(program, numbered[cut:])
        handed = pickle.loads(pickle.dumps(later, pickle.HIGHEST_PROTOCOL))
        found = _checked(program, numbered[:cut])
        found.then(handed)
        # then
        assert handed == later, cut
        assert list(handed.purchase_keys) == list(later.purchase_keys), cut  # in file order
        assert found == _checked(program, numbered), cut


def test_progress_is_told_once_for_each_row_when_a_part_started_inside_a_quoted_field(
    program, tmp_path, settings, in_parts, monkeypatch
):
    # given: a stray quote near the top, then stores of eleven lines each (quoted): the quotes before every line
    # end inside them are even, so the file is cut inside them, and a part that starts there counts lines as rows;
    # the first part is checked once the others have had time to finish and report
    parent, check = os.getpid(), checking_module._check

    def late(*args):
        if os.getpid() == parent:
            time.sleep(2)
        return check(*args)

    monkeypatch.setattr(checking_module, "_check", late)
    member = MemberFactory()
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    store = "S\n" + "\n".join("ABCDEFGHIJ")
    rows = [{**_row(f"T{i}", member, "10.00", at + timedelta(minutes=i)), "store": store} for i in range(400)]
    rows[1] = {**rows[1], "store": "S", "external_id": 'T1"x'}
    path = tmp_path / "tx.csv"
    path.write_text(_csv(tmp_path, rows).read_text().replace('"T1""x"', 'T1"x'))
    settings.IMPORT_CHECKERS = 3
    heard = []
    # when
    report = _import(program, path, batch_size=5, progress=lambda stage, n: heard.append((stage, n)))
    # then
    assert in_parts == [None]
    assert (report.read, report.imported) == (400, 400)
    assert sum(n for stage, n in heard if stage == "check") == 400


def test_with_autocommit_off_the_import_sees_the_callers_uncommitted_rows(program, tmp_path, settings, in_parts):
    # given: members created in a database transaction not committed yet (autocommit off)
    settings.IMPORT_CHECKERS = 2
    at = datetime(2025, 5, 1, 12, tzinfo=UTC)
    transaction.set_autocommit(False)
    try:
        members = [MemberFactory() for _ in range(4)]
        path = _csv(tmp_path, [_row(f"T{i}", members[i % 4], "10.00", at) for i in range(200)])
        # when
        report = _import(program, path, writers=2)
        # then: checked in one process and written in one lane, on the caller's connection
        assert in_parts == []
        assert (report.imported, report.invalid) == (200, 0)
        assert Transaction.objects.count() == 200
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
