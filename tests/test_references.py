"""Foreign keys checked set-based for bulk writes (core/references.py): what PostgreSQL's per-row triggers would
have refused is refused when the block ends, the rows named are locked as the triggers lock them, and nothing else
is skipped."""

import threading
import uuid
from decimal import Decimal

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.references import references_checked
from loyalty.imports import transactions_import
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.verify import ledger_verify
from members.models import Member
from tests.factories import MemberFactory

pytestmark = pytest.mark.django_db

# Every table that a references_checked block writes (loyalty/imports/writing.py, loyalty/ledger/bulk.py).
WRITTEN_IN_BLOCKS = (Transaction, Entry, Lot)
MISSING = 2**62  # no row has this id


def _purchase(program, *, member_id, external_id="T1") -> Transaction:
    now = timezone.now()
    return Transaction.objects.create(
        program=program,
        store="S1",
        external_id=external_id,
        channel=Transaction.Channel.POS,
        member_id=member_id,
        kind=Transaction.Kind.PURCHASE,
        occurred_at=now,
        currency="SEK",
        total=Decimal("10.00"),
        created_at=now,
    )


def _role() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('session_replication_role')")
        return cursor.fetchone()[0]


def _constraints_checked_now() -> None:
    """Fire the deferred foreign-key triggers queued so far (a test's transaction never commits)."""
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_a_reference_to_a_missing_row_is_refused_when_the_block_ends_and_the_block_writes_nothing(program):
    # given
    member = MemberFactory(program=program)
    # when: one good row and one naming no member
    with pytest.raises(IntegrityError, match="member_id name no row of members_member"):
        with references_checked(Transaction) as block:
            rows = [_purchase(program, member_id=member.pk), _purchase(program, member_id=MISSING, external_id="T2")]
            block.written(Transaction, "id", [row.pk for row in rows])
    # then: neither row is there, and the rest of the transaction is checked by the triggers again
    assert not Transaction.objects.exists()
    assert _role() == "origin"
    _constraints_checked_now()


def test_inside_a_block_the_per_row_triggers_are_not_queued_which_is_why_it_checks_what_it_wrote(program):
    # given: a row naming no member, written in a block but not declared to it
    with references_checked(Transaction):
        _purchase(program, member_id=MISSING)
    # then: no trigger was queued for it; declared, the block would have refused it (the test above)
    _constraints_checked_now()
    assert Transaction.objects.filter(member_id=MISSING).exists()


def test_after_a_block_the_triggers_check_each_row_again(program):
    # given
    with references_checked(Transaction) as block:
        row = _purchase(program, member_id=MemberFactory(program=program).pk)
        block.written(Transaction, "id", [row.pk])
    # when: a bad row after the block, in the same transaction (in a savepoint, which the error undoes)
    with pytest.raises(IntegrityError), transaction.atomic():
        _purchase(program, member_id=MISSING, external_id="T2")
        # then
        _constraints_checked_now()


def test_rows_named_apart_or_in_one_run_of_ids_are_checked_alike(program):
    # given: three rows, of which the block is told of the first and the last (ids not in one run)
    members = [MemberFactory(program=program) for _ in range(2)]
    # when
    with pytest.raises(IntegrityError, match="member_id"):
        with references_checked(Transaction) as block:
            first = _purchase(program, member_id=members[0].pk, external_id="T1")
            _purchase(program, member_id=members[1].pk, external_id="T2")
            last = _purchase(program, member_id=MISSING, external_id="T3")
            block.written(Transaction, "id", [first.pk, last.pk])
    # then
    assert not Transaction.objects.exists()


def test_an_error_inside_a_block_undoes_it_and_restores_the_triggers(program):
    # given
    member = MemberFactory(program=program)
    # when
    with pytest.raises(RuntimeError):
        with references_checked(Transaction) as block:
            row = _purchase(program, member_id=member.pk)
            block.written(Transaction, "id", [row.pk])
            raise RuntimeError("a failure inside the block")
    # then
    assert not Transaction.objects.exists()
    assert _role() == "origin"


@pytest.mark.django_db(transaction=True)
def test_the_rows_a_block_names_are_locked_until_it_commits_as_the_triggers_lock_them(program):
    # given: a member, committed
    member = MemberFactory(program=program)
    tried: list = []

    def delete_member():  # another connection: the member's deletion must wait for the import's commit
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '200ms'")
                cursor.execute("SELECT 1 FROM members_member WHERE id = %s FOR UPDATE", [member.pk])
            tried.append("locked")
        except DatabaseError as exc:
            tried.append(exc)
        finally:
            connection.close()

    # when: a block names the member, and its transaction is still open
    with transaction.atomic():
        with references_checked(Transaction) as block:
            row = _purchase(program, member_id=member.pk)
            block.written(Transaction, "id", [row.pk])
        other = threading.Thread(target=delete_member)
        other.start()
        other.join()
    # then: the other connection could not take the member's row; after the commit it can
    assert isinstance(tried[0], DatabaseError) and "lock timeout" in str(tried[0])
    delete_member()
    assert tried[1] == "locked"


@pytest.fixture
def role(db):
    """A role of its own for this connection (SET LOCAL ROLE, undone with the test's transaction), with every right
    on the tables but none to skip triggers; the test grants and revokes more."""
    name = f"loyalty_test_{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name} NOLOGIN")
        cursor.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}")
        cursor.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}")
        cursor.execute(f"SET LOCAL ROLE {name}")
    yield name
    with connection.cursor() as cursor:
        cursor.execute("RESET ROLE")


def _as_superuser(*statements: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        role = cursor.fetchone()[0]
        cursor.execute("RESET ROLE")
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(f"SET LOCAL ROLE {role}")


def test_without_the_right_to_skip_them_the_triggers_check_each_row(program, role):
    # when
    with pytest.raises(IntegrityError), transaction.atomic():
        with references_checked(Transaction) as block:
            assert not block.skipping
            _purchase(program, member_id=MISSING)
        # then: the trigger was queued as usual
        _constraints_checked_now()


def test_the_rights_are_asked_anew_for_every_block_on_the_same_connection(program, role):
    # given: the right granted, and a block that used it
    _as_superuser(f"GRANT SET ON PARAMETER session_replication_role TO {role}")
    with references_checked(Transaction) as block:
        assert block.skipping
    # when: revoked while the connection lives
    _as_superuser(f"REVOKE SET ON PARAMETER session_replication_role FROM {role}")
    # then: the next block leaves the triggers on, rather than failing to set the role
    with references_checked(Transaction) as block:
        assert not block.skipping
        row = _purchase(program, member_id=MemberFactory(program=program).pk)
        block.written(Transaction, "id", [row.pk])
    assert Transaction.objects.filter(pk=row.pk).exists()


def test_without_update_on_a_table_referred_to_the_triggers_check_each_row(program, role):
    # given: the right to skip, but not to lock members (FOR KEY SHARE needs UPDATE; the triggers run as the owner)
    _as_superuser(
        f"GRANT SET ON PARAMETER session_replication_role TO {role}",
        f"REVOKE UPDATE ON members_member FROM {role}",
    )
    # when
    with references_checked(Transaction) as block:
        row = _purchase(program, member_id=MemberFactory(program=program).pk)
        block.written(Transaction, "id", [row.pk])
    # then
    assert not block.skipping
    assert Transaction.objects.filter(pk=row.pk).exists()
    # and a block that writes only into tables whose references it may lock does skip them
    with references_checked(Lot) as block:
        assert block.skipping


def test_the_tables_written_in_blocks_have_no_trigger_that_an_insert_fires_but_the_foreign_key_checks():
    # A block skips every trigger that does not fire in replica mode, not only foreign keys: a trigger added to one
    # of these tables (a user's, or the internal one of a DEFERRABLE unique constraint) would be skipped by the
    # imports unnoticed. Make it ENABLE ALWAYS, or write it into the check.
    tables = [model._meta.db_table for model in WRITTEN_IN_BLOCKS]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text FROM pg_trigger "
            "WHERE tgrelid = ANY(%s::regclass[]) AND tgtype & 4 <> 0 AND tgenabled <> 'A'",  # 4: fires on INSERT
            [tables],
        )
        fired = cursor.fetchall()
    assert {function for _, _, function in fired} == {'"RI_FKey_check_ins"'}
    assert {table for table, _, _ in fired} == set(tables)  # the query sees each table's triggers


@pytest.mark.parametrize("skipping", [True, False])
def test_an_import_makes_the_same_ledger_with_the_triggers_skipped_or_not(program, request, skipping):
    # given: the test's superuser, or a role that may not skip them
    if not skipping:
        request.getfixturevalue("role")
    members = [MemberFactory(program=program) for _ in range(3)]
    rows = [
        (
            i + 2,
            {
                "store": "S1",
                "external_id": f"T{i}",
                "channel": "pos",
                "member": members[i % 3].member_number if i % 5 else "",
                "type": "purchase",
                "occurred_at": "2026-01-02T10:00:00+00:00",
                "currency": "SEK",
                "total": f"{100 + i}.50",
            },
        )
        for i in range(40)
    ]
    # when
    with CaptureQueriesContext(connection) as queries:
        report = transactions_import(program=program, rows=rows, batch_size=7)
    # then
    assert (report.imported, report.errors) == (40, [])
    checked = [q["sql"] for q in queries if q["sql"].startswith("WITH new AS MATERIALIZED")]
    # 6 chunks' transactions, and the entries and lots of 5: the anonymous purchases' last chunk credits nothing
    assert len(checked) == (16 if skipping else 0)
    assert Entry.objects.count() == Lot.objects.count() == 32  # anonymous purchases earn nothing
    assert sorted(Member.objects.values_list("account__lifetime_earned", flat=True)) == sorted(
        sum(100 + i for i in range(40) if i % 5 and i % 3 == k) for k in range(3)
    )
    assert ledger_verify() == []
    _constraints_checked_now()


# --- rows the block's transaction wrote itself (Block.own) -------------------------------------------------------


def _entry(member_id: int, transaction_id: int) -> Entry:
    now = timezone.now()
    return Entry.objects.create(
        account_id=member_id,
        kind=Entry.Kind.EARN,
        points=5,
        available_after=5,
        pending_after=0,
        occurred_at=now,
        created_at=now,
        transaction_id=transaction_id,
    )


def _locked(model, pk) -> bool:
    """Whether the row carries a lock (or a deletion) in its header."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT xmax::text::bigint <> 0 FROM {model._meta.db_table} WHERE id = %s", [pk])
        return cursor.fetchone()[0]


def test_a_reference_to_a_row_the_transaction_wrote_itself_is_counted_not_probed_and_locked(program):
    # given: a member and its account, and a purchase written in a block of the same transaction
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    with references_checked(Transaction) as block:
        txn = _purchase(program, member_id=member.pk)
        block.written(Transaction, "id", [txn.pk])
    assert _locked(Member, member.pk)  # the purchase's member, probed and locked
    # when: an entry names the purchase, declared the transaction's own
    with references_checked(Entry) as block:
        entry = _entry(member.pk, txn.pk)
        block.written(Entry, "id", [entry.pk])
        block.own(Transaction, [txn.pk])
    # then: the purchase was counted, not locked
    assert not _locked(Transaction, txn.pk)
    assert Entry.objects.filter(pk=entry.pk).exists()


def test_rows_declared_the_transactions_own_that_are_not_there_are_refused_and_the_block_writes_nothing(program):
    # given
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    # when: an entry names a purchase that is not there, declared the transaction's own
    with pytest.raises(IntegrityError, match="declared inserted by this transaction are not all there"):
        with references_checked(Entry) as block:
            entry = _entry(member.pk, MISSING)
            block.written(Entry, "id", [entry.pk])
            block.own(Transaction, [MISSING])
    # then
    assert not Entry.objects.exists()
    assert _role() == "origin"


def test_own_rows_that_no_written_row_refers_to_are_not_counted(program):
    # given: an entry and its lot written in one block, as the import writes them; the lot is keyed by its entry, so
    # it is the block's own row too, but no row of the block refers to a lot
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    txn = _purchase(program, member_id=member.pk)
    now = timezone.now()
    # when
    with CaptureQueriesContext(connection) as queries, references_checked(Entry, Lot) as block:
        entry = _entry(member.pk, txn.pk)
        Lot.objects.create(
            account_id=member.pk, entry=entry, amount=5, remaining=5, available_from=now, expires_at=None, matured=True
        )
        block.written(Entry, "id", [entry.pk])
        block.written(Lot, "entry_id", [entry.pk])
    # then: the entries were counted (the lot refers to its entry), the lots not
    statements = [q["sql"] for q in queries.captured_queries]
    assert any("(SELECT count(*) FROM loyalty_entry WHERE id BETWEEN" in sql for sql in statements)
    assert not any("(SELECT count(*) FROM loyalty_lot WHERE entry_id BETWEEN" in sql for sql in statements)
    assert Lot.objects.filter(pk=entry.pk).exists()


def test_a_reference_outside_the_transactions_own_rows_is_probed_as_any_other(program):
    # given: a purchase of the transaction's own, and an entry that names another, missing one
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    txn = _purchase(program, member_id=member.pk)
    # when
    with pytest.raises(IntegrityError, match="transaction_id name no row of loyalty_transaction"):
        with references_checked(Entry) as block:
            entries = [_entry(member.pk, txn.pk), _entry(member.pk, MISSING)]
            block.written(Entry, "id", [e.pk for e in entries])
            block.own(Transaction, [txn.pk])
    # then
    assert not Entry.objects.exists()


# --- rows the block's transaction holds locked (Block.holds) ------------------------------------------------------


def _reads_of(model) -> int:
    """How many times this transaction has read the table of `model`, by index or whole."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(idx_scan, 0) + seq_scan FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
            [model._meta.db_table],
        )
        return cursor.fetchone()[0]


@pytest.mark.parametrize("held", [True, False])
def test_a_reference_to_a_row_the_transaction_holds_locked_is_not_probed(program, held):
    # given: a member's purchase, and the member's account locked by this transaction
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    txn = _purchase(program, member_id=member.pk)
    locked = list(Account.objects.select_for_update().filter(pk=member.pk).values_list("pk", flat=True))
    before = _reads_of(Account)
    # when: an entry of the account is written in a block, which is told of the lock or not
    with references_checked(Entry) as block:
        entry = _entry(member.pk, txn.pk)
        block.written(Entry, "id", [entry.pk])
        if held:
            block.holds(Account, locked)
    # then: the account is read to check the entry only where the block was not told
    assert (_reads_of(Account) > before) is not held
    assert Entry.objects.filter(pk=entry.pk).exists()


def test_a_reference_outside_the_rows_the_transaction_holds_locked_is_probed_as_any_other(program):
    # given: one account locked by this transaction
    member = MemberFactory(program=program)
    Account.objects.create(member=member)
    txn = _purchase(program, member_id=member.pk)
    locked = list(Account.objects.select_for_update().filter(pk=member.pk).values_list("pk", flat=True))
    # when: an entry names an account that is not there
    with pytest.raises(IntegrityError, match="account_id name no row of loyalty_account"):
        with references_checked(Entry) as block:
            entries = [_entry(member.pk, txn.pk), _entry(MISSING, txn.pk)]
            block.written(Entry, "id", [e.pk for e in entries])
            block.holds(Account, locked)
    # then
    assert not Entry.objects.exists()
