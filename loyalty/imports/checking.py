"""An import's check pass (`file_check`): every row parsed and checked, its member resolved, and the good rows made
ready to write and spooled to temporary files, before anything is written. A large file is checked in parts, each
in its own process, at once (loyalty.imports.parts): the pass is Python's work, one core's at a time."""

import contextlib
import marshal
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.db import connection

from core.models import Program
from loyalty.event_models import Referral
from loyalty.imports.files import TransactionFile
from loyalty.imports.parts import parts_check
from loyalty.imports.report import ImportReport
from loyalty.imports.rows import Row, RowInvalid, RowParser
from loyalty.imports.writing import Earnings, members_resolve
from loyalty.models import Transaction
from loyalty.transactions import MAX_POINTS, points_out_of_range
from members.models import Member

# Plain strings: a Choices member costs a few times as much to look up and compare, a few times a row.
_PURCHASE, _RETURN, _ACTIVE = Transaction.Kind.PURCHASE.value, Transaction.Kind.RETURN.value, Member.Status.ACTIVE.value

# A file smaller than this is checked in one process: a part's process and what it hands back cost more than they
# save there (about 60,000 rows of the benchmark's file).
PARTS_FROM_BYTES = 4 << 20

# The most members a check keeps once found (about 150 bytes each), so as not to look them up again in each chunk.
# Whether each is still active is checked again as its chunk is written (writing._members_inactive).
MEMBERS_KNOWN = 1_000_000
_NONE, _ANONYMOUS = (None, None), (None, _ACTIVE)

# Marshal's version 2: later versions look up every object that others share too (the rows' strings, while the rows
# are alive), to write it once, which costs more than it saves here (0.5 µs a row of the spool against 0.8).
_MARSHAL_VERSION = 2


@dataclass
class Checked:
    """What the check found: the bad lines, the purchases' and returns' keys, the returns (with whether their
    purchase came before them in the file), and whose each purchase is (its lane's key: the member number, or the
    external id of an anonymous purchase), by external id. `owners` is None where lanes could write differently
    from one: an external id names purchases of several owners (in the file or the database), a return's own key
    is another row's, or a return undoes a referral (it takes points from the referrer, whose rows may be in another
    lane)."""

    bad: set[int] = field(default_factory=set)
    owners: dict[str, str] | None = field(default_factory=dict)
    purchases_seen: set[str] = field(default_factory=set)  # external ids, for returns that name no store
    # (store, external id), and the returns' apart; a dict, whose keys keep file order (__getstate__).
    purchase_keys: dict[tuple[str, str], None] = field(default_factory=dict)
    return_keys: set[tuple[str, str]] = field(default_factory=set)
    returns: list[tuple[Row, bool]] = field(default_factory=list)

    def own(self, external_id: str, owner: str) -> None:
        if self.owners is not None and self.owners.setdefault(external_id, owner) != owner:
            self.owners = None

    def then(self, later: "Checked") -> None:
        """Take in what the check of a later part of the file found, as if it had gone on from here."""
        mine, theirs = self.owners, later.owners
        if (
            mine is None
            or theirs is None
            or any(key in self.purchase_keys or key in self.return_keys for key in later.return_keys)
            or any(key in later.purchase_keys for key in self.return_keys)
            or any(mine[external_id] != theirs[external_id] for external_id in mine.keys() & theirs.keys())
        ):
            self.owners = None
        else:
            mine.update(theirs)
        for row, in_file in later.returns:
            if not in_file:
                in_file = (
                    (row.original_store, row.original_external_id) in self.purchase_keys
                    if row.original_store
                    else row.original_external_id in self.purchases_seen
                )
            self.returns.append((row, in_file))
        self.bad |= later.bad
        self.purchases_seen |= later.purchases_seen
        self.purchase_keys |= later.purchase_keys
        self.return_keys |= later.return_keys

    # A part's process hands what it found to the import's pickled (parts._part_process). Its keys and owners go as
    # lists, in file order, in one blob that marshal writes and reads: pickle spent a quarter of a second on the sets
    # and dict of 100,000 purchases, this about a third of that.
    _LARGE = ("purchase_keys", "owners", "purchases_seen")

    def __getstate__(self) -> dict:
        owners = self.owners
        seen = self.purchases_seen
        large = (
            list(self.purchase_keys),
            None if owners is None else (list(owners), list(owners.values())),
            None if owners is not None and owners.keys() == seen else list(seen),  # else it is the owners' keys
        )
        return {
            **{k: v for k, v in vars(self).items() if k not in self._LARGE},
            "large": marshal.dumps(large, _MARSHAL_VERSION),
        }

    def __setstate__(self, state: dict) -> None:
        keys, owners, seen = marshal.loads(state.pop("large"))
        vars(self).update(state)
        self.purchase_keys = dict.fromkeys(keys)
        self.owners = None if owners is None else dict(zip(*owners, strict=True))
        self.purchases_seen = set(self.owners if seen is None else seen)


def uncommitted_work() -> bool:
    """Whether this connection may hold rows not committed yet (inside a database transaction, or with autocommit
    off), which other connections, and so other processes, cannot see."""
    return connection.in_atomic_block or not connection.get_autocommit()


def file_check(
    parser: RowParser, rows, batch_size: int, report: ImportReport, progress, earnings: Earnings, processes: int, stack
) -> tuple[Checked, list]:
    """Check `rows` (file order) as _check does; (what was found, the spools in file order), each spool a temporary
    file entered in `stack`. A TransactionFile of PARTS_FROM_BYTES or more is checked in up to `processes` parts
    at once, each but the first in a process forked for it, unless the caller may hold uncommitted rows (the
    processes could not see them). Where a process cannot be forked, or a part of a CSV file turns out not
    to end between rows, the whole file is checked again in one."""
    parts = None
    if (
        isinstance(rows, TransactionFile)
        and processes > 1
        and hasattr(os, "fork")
        and not uncommitted_work()
        and rows.path.stat().st_size >= PARTS_FROM_BYTES
    ):
        parts = rows.parts(processes)
    if parts and len(parts) > 1:
        told = [0]  # rows whose check progress was told

        def telling(stage: str, count: int) -> None:
            told[0] += count
            progress(stage, count)

        with contextlib.ExitStack() as attempt:
            found = parts_check(_check, parser, parts, batch_size, telling, earnings, attempt)
            if found is not None:
                checked, spools, part_report = found
                report.add(part_report)
                stack.push(attempt.pop_all())
                _returns_check(parser.program, batch_size, checked, report)
                return checked, spools
        progress = _told_after(progress, told[0])
    spool = stack.enter_context(tempfile.TemporaryFile(prefix="import-"))
    checked = _check(parser, rows, batch_size, report, progress, earnings, spool)
    _returns_check(parser.program, batch_size, checked, report)
    return checked, [spool]


def _told_after(progress, skipped: int):
    """`progress`, told nothing of the first `skipped` rows: those that the parts' check told of already."""
    left = [skipped]

    def told(stage: str, count: int) -> None:
        quiet = min(left[0], count)
        left[0] -= quiet
        if count > quiet:
            progress(stage, count - quiet)

    return told


def _check(parser: RowParser, rows, batch_size: int, report: ImportReport, progress, earnings: Earnings, spool):
    """Every row parsed and checked, members resolved a chunk at a time, and the chunk's good rows made ready to
    write and added to `spool` (spool_write), in file order: purchases as Earnings.ready makes them, returns as
    rows. The returns' purchases are checked afterwards, once the whole file is read (_returns_check).

    A purchase of a member found in an earlier chunk (active then; writing checks again), or of no member, is made
    ready as it is read; the others wait for their chunk's members to be looked up. Either way the chunk is spooled
    in file order."""
    checked = Checked()
    bad, purchases_seen, purchase_keys = checked.bad, checked.purchases_seen, checked.purchase_keys
    return_keys, returns = checked.return_keys, checked.returns
    chunk: list = []  # the chunk's purchases made ready (tuples), and its rows still to resolve (Rows)
    waiting = False  # whether the chunk has rows to resolve
    read = report.read  # the rows read before these, so that progress counts bad rows too
    known: dict[str, tuple[int, str]] = {}  # the members found so far: most files name each member many times
    ready_made, parse = earnings.ready, parser.parse

    def refused(row: Row, name: str, message: str) -> None:
        bad.add(row.line)
        report.add_error(row.line, name, message)

    def chunk_end():
        nonlocal waiting
        ready, plain = chunk, True
        if waiting:
            found = members_resolve(
                parser.program, {n for row in chunk if type(row) is not tuple and (n := row.member) and n not in known}
            )
            ready = []
            for row in chunk:
                if type(row) is tuple:
                    ready.append(row)
                    continue
                member = row.member
                member_id, status = (known.get(member) or found.get(member, _NONE)) if member else _ANONYMOUS
                if status is None:
                    refused(row, "member", f"No member {member} in programme {parser.program.code}.")
                elif row.kind == _RETURN:
                    ready.append(row)
                    plain = False
                elif status != _ACTIVE:
                    refused(row, "member", f"Member {member} is {status}.")
                elif (made := ready_made(row, member_id))[5] > MAX_POINTS:
                    refused(row, "total", points_out_of_range(made[5]))  # as transaction_record refuses it
                else:
                    ready.append(made)
            if len(known) < MEMBERS_KNOWN:  # active ones only: writing re-checks those, not a refusal's status
                known.update((n, found_) for n, found_ in found.items() if found_[1] == _ACTIVE)
        spool_write(spool, ready, plain)
        chunk.clear()
        waiting = False
        heard()

    def heard():
        nonlocal read
        progress("check", report.read - read)
        read = report.read

    for number, raw in rows:
        report.read += 1
        try:
            row = parse(number, raw)
        except RowInvalid as exc:
            bad.add(number)
            for i, (name, message) in enumerate(exc.errors):
                report.add_error(number, name, message, new_row=i == 0)
            continue
        store, external_id, member, kind = row[1], row[2], row[4], row[5]  # not four attribute lookups
        key = (store, external_id)
        if kind == _PURCHASE:
            purchases_seen.add(external_id)
            purchase_keys[key] = None
            checked.own(external_id, member or external_id)
            if key in return_keys:
                checked.owners = None
            found = known.get(member) if member else _ANONYMOUS
            if found is not None and (made := ready_made(row, found[0]))[5] <= MAX_POINTS:
                chunk.append(made)
            else:
                chunk.append(row)
                waiting = True
        else:
            if key in purchase_keys or key in return_keys:
                checked.owners = None
            return_keys.add(key)
            if row.original_store:
                returns.append((row, (row.original_store, row.original_external_id) in purchase_keys))
            else:
                returns.append((row, row.original_external_id in purchases_seen))
            chunk.append(row)
            waiting = True
        if len(chunk) == batch_size:
            chunk_end()
    if chunk:
        chunk_end()
    if report.read > read:
        heard()
    return checked


def spool_write(spool, ready: list, plain: bool) -> None:
    """Add a chunk's rows to `spool`: with marshal where they are `plain` values only (purchases as Earnings.ready
    makes them), at a third of pickle's cost; with pickle where there are returns (rows of dates and decimals)."""
    data = marshal.dumps(ready, _MARSHAL_VERSION) if plain else pickle.dumps(ready, pickle.HIGHEST_PROTOCOL)
    spool.write(b"m" if plain else b"p")
    spool.write(len(data).to_bytes(8, "little"))
    spool.write(data)


def spool_read(spool) -> Iterator[list]:
    """What spool_write added to `spool`, a chunk's rows at a time. Each is read whole first: marshal.load reads a
    file piece by piece, ten times as slowly."""
    spool.seek(0)
    while kind := spool.read(1):
        data = spool.read(int.from_bytes(spool.read(8), "little"))
        yield marshal.loads(data) if kind == b"m" else pickle.loads(data)


def _returns_check(program: Program, batch_size: int, checked: Checked, report: ImportReport):
    """A return must follow its purchase in the file, or its purchase must be recorded already. The recorded
    purchases that the returns name are read for all of them: their owners too decide the returns' lanes."""
    bad, returns = checked.bad, checked.returns
    for start in range(0, len(returns), batch_size):
        part = returns[start : start + batch_size]
        known: set = set()  # external ids, and (store, external id)
        recorded = Transaction.objects.filter(
            program=program,
            kind=Transaction.Kind.PURCHASE,
            external_id__in={row.original_external_id for row, _ in part},
        )
        for store, external_id, number in recorded.values_list("store", "external_id", "member__member_number"):
            known.update((external_id, (store, external_id)))
            checked.own(external_id, number or external_id)
        if Referral.objects.filter(transaction__in=recorded, undone_by__isnull=True).exists():
            checked.owners = None
        for row, in_file in part:
            original = (
                (row.original_store, row.original_external_id) if row.original_store else row.original_external_id
            )
            if not in_file and original not in known and row.line not in bad:
                bad.add(row.line)
                at = f" at store {row.original_store}" if row.original_store else ""
                report.add_error(
                    row.line,
                    "original_external_id",
                    f"No such purchase{at}, neither recorded nor earlier in the file.",
                )
