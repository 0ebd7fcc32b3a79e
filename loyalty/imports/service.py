"""transactions_import: check the whole file, then import it chunk by chunk, in lanes of members written at once."""

import gc
import pickle
import queue
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection
from django.utils import timezone

from core.db import batch_statements
from core.models import Program
from loyalty.event_models import Referral
from loyalty.imports.report import ImportAborted, ImportReport
from loyalty.imports.rows import Row, RowInvalid, RowParser
from loyalty.imports.writing import Earnings, Prepared, chunk_write, members_resolve
from loyalty.models import Transaction
from loyalty.transactions import MAX_POINTS, points_out_of_range
from members.models import Member


@batch_statements()
def transactions_import(
    *,
    program: Program,
    rows: Iterable[tuple[int, dict | None]],
    batch_size: int = 5000,
    skip_invalid: bool = False,
    progress: Callable[[str, int], None] | None = None,
    writers: int | None = None,
) -> ImportReport:
    """Import purchases and returns, each row as transaction_record would record it. Idempotent on (store,
    external_id): a rerun imports nothing twice. `rows` ((line number, fields), e.g. a TransactionFile) is read
    once: every row is checked, and if one is bad nothing is written, unless `skip_invalid`, which imports the
    rest. The good rows, made ready to write on the way, wait in a temporary file (the spool, about the size of the
    file), from which they are imported in chunks of `batch_size`, each chunk one database transaction whose ledger
    credits lock their accounts in key order. `progress(stage, rows)` hears of each chunk ("check", "import").

    Written in `writers` lanes at once (settings.IMPORT_WRITERS), each on its own database connection: a member's
    rows, and the returns of their purchases, all go to one lane, in file order, so lanes never wait for each other's
    accounts, and the database works on one lane's chunk while Python makes the next. One lane inside a caller's
    database transaction (other connections would not see its rows), and where an external id names purchases of
    several members in the file or the database, whose returns could not be told apart beforehand."""
    started = time.perf_counter()
    report = ImportReport()
    progress = progress or (lambda stage, count: None)
    now = timezone.now()
    with _collections_rarer(), tempfile.TemporaryFile(prefix="import-") as spool:
        checked = _check(RowParser(program, now), rows, batch_size, report, progress, Earnings(program, now), spool)
        if not report.invalid or skip_invalid:
            writers = settings.IMPORT_WRITERS if writers is None else writers
            lanes = 1 if checked.owners is None or connection.in_atomic_block else max(1, writers)
            spool.seek(0)
            chunks = _spooled(spool, checked, batch_size, lanes)
            if lanes == 1:
                for _, chunk in _ahead(chunks):
                    chunk_write(program=program, chunk=chunk, report=report, skip_invalid=skip_invalid)
                    progress("import", chunk.size)
            else:
                _write_in_lanes(program, chunks, lanes, report, skip_invalid, progress)
    report.seconds = time.perf_counter() - started
    return report


# Plain strings: a Choices member costs a few times as much to look up and compare, a few times a row.
_PURCHASE, _RETURN, _ACTIVE = Transaction.Kind.PURCHASE.value, Transaction.Kind.RETURN.value, Member.Status.ACTIVE.value
_collector = {"lock": threading.Lock(), "users": 0, "threshold": gc.get_threshold()}


@contextmanager
def _collections_rarer():
    """Python's cycle collector run a hundred times less often while imports run. An import allocates a few dozen
    objects a row, nearly all freed as soon as made and none in cycles, yet each 700 of them set off a collection,
    which cost a quarter of the import's Python time (measured on the benchmark's file). It still runs; the previous
    thresholds come back when the last import running in the process ends."""
    with _collector["lock"]:
        if not _collector["users"]:
            _collector["threshold"] = gc.get_threshold()
            gc.set_threshold(100 * _collector["threshold"][0], *_collector["threshold"][1:])
        _collector["users"] += 1
    try:
        yield
    finally:
        with _collector["lock"]:
            _collector["users"] -= 1
            if not _collector["users"]:
                gc.set_threshold(*_collector["threshold"])


@dataclass
class _Checked:
    """What the check found: the bad lines, and whose each purchase is (its lane's key: the member number,
    or the external id of an anonymous purchase), by external id. `owners` is None where lanes could write
    differently from one: an external id names purchases of several owners (in the file or the database), a
    return's own key is another row's, or a return undoes a referral (it takes points from the referrer, whose rows
    may be in another lane)."""

    bad: set[int] = field(default_factory=set)
    owners: dict[str, str] | None = field(default_factory=dict)

    def own(self, external_id: str, owner: str) -> None:
        if self.owners is not None and self.owners.setdefault(external_id, owner) != owner:
            self.owners = None


def _check(parser: RowParser, rows, batch_size: int, report: ImportReport, progress, earnings: Earnings, spool):
    """Every row parsed and checked, members resolved a chunk at a time, and the chunk's good rows made ready to
    write and pickled to `spool`, in file order: purchases as Earnings.ready makes them, returns as rows."""
    checked = _Checked()
    bad = checked.bad
    purchases_seen: set[str] = set()  # external ids, for returns that name no store
    purchase_keys: set[tuple[str, str]] = set()  # (store, external id), and the returns' apart
    return_keys: set[tuple[str, str]] = set()
    returns: list[tuple[Row, bool]] = []  # with whether their purchase came before them in the file
    chunk: list[Row] = []

    def members_check():
        found = members_resolve(parser.program, {row.member for row in chunk if row.member})
        ready = []
        for row in chunk:
            member_id, status = found.get(row.member, (None, None)) if row.member else (None, _ACTIVE)
            name = "member"
            if status is None:
                message = f"No member {row.member} in programme {parser.program.code}."
            elif row.kind == _RETURN:
                ready.append(row)
                continue
            elif status != _ACTIVE:
                message = f"Member {row.member} is {status}."
            elif member_id is not None and (points := earnings.points(row.total, row.occurred_at)[0]) > MAX_POINTS:
                name, message = "total", points_out_of_range(points)  # as transaction_record refuses it
            else:
                ready.append(earnings.ready(row, member_id))
                continue
            bad.add(row.line)
            report.add_error(row.line, name, message)
        pickle.dump(ready, spool, pickle.HIGHEST_PROTOCOL)
        progress("check", len(chunk))
        chunk.clear()

    for number, raw in rows:
        report.read += 1
        try:
            row = parser.parse(number, raw)
        except RowInvalid as exc:
            bad.add(number)
            for i, (name, message) in enumerate(exc.errors):
                report.add_error(number, name, message, new_row=i == 0)
            continue
        key = (row.store, row.external_id)
        if row.kind == _PURCHASE:
            purchases_seen.add(row.external_id)
            purchase_keys.add(key)
            checked.own(row.external_id, row.member or row.external_id)
            if key in return_keys:
                checked.owners = None
        else:
            if key in purchase_keys or key in return_keys:
                checked.owners = None
            return_keys.add(key)
            if row.original_store:
                returns.append((row, (row.original_store, row.original_external_id) in purchase_keys))
            else:
                returns.append((row, row.original_external_id in purchases_seen))
        chunk.append(row)
        if len(chunk) == batch_size:
            members_check()
    if chunk:
        members_check()
    _returns_check(parser.program, returns, batch_size, checked, report)
    return checked


def _returns_check(program: Program, returns: list, batch_size: int, checked: _Checked, report: ImportReport):
    """A return must follow its purchase in the file, or its purchase must be recorded already. The recorded
    purchases that the returns name are read for all of them: their owners too decide the returns' lanes."""
    bad = checked.bad
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


def _spooled(spool, checked: _Checked, batch_size: int, lanes: int) -> Iterator[tuple[int, Prepared]]:
    """(lane, chunk) for each chunk of at most `batch_size` rows of one lane from `spool`, in file order within the
    lane; returns found bad after they were spooled (_returns_check) are left out. A chunk writes its purchases
    before its returns, so a purchase of a member whom a return in the chunk reaches starts a new chunk: that
    member's rows then reach the ledger in file order, as on the per-row path (under the available-only return
    policy a return takes what its member has before the purchases after it). Where who a return reaches is not
    known (one lane for lack of owners: a referral's two accounts, say), any purchase after a return does."""
    chunks: list[list] = [[] for _ in range(lanes)]
    returned: list[set] = [set() for _ in range(lanes)]  # the owners the returns of each lane's chunk reach
    while True:
        try:
            ready = pickle.load(spool)
        except EOFError:
            break
        for item in ready:
            purchase = type(item) is tuple
            if purchase:  # (line, (store, external_id), member number, ...)
                owner = item[2] or item[1][1]
            elif item.line in checked.bad:
                continue
            else:  # a return, with the purchase it returns: the same accounts, the purchase's row locked
                owner = checked.owners.get(item.original_external_id, item.member) if checked.owners else None
            lane = zlib.crc32(owner.encode()) % lanes if lanes > 1 else 0
            if not purchase:
                returned[lane].add(owner)
            elif returned[lane] and (owner in returned[lane] or None in returned[lane]):
                yield lane, _prepared(chunks[lane])
                chunks[lane], returned[lane] = [], set()
            chunk = chunks[lane]
            chunk.append(item)
            if len(chunk) == batch_size:
                yield lane, _prepared(chunk)
                chunks[lane], returned[lane] = [], set()
    for lane, chunk in enumerate(chunks):
        if chunk:
            yield lane, _prepared(chunk)


def _prepared(items: list) -> Prepared:
    purchases = [item for item in items if type(item) is tuple]
    return Prepared(purchases, [item for item in items if type(item) is not tuple], len(items))


def _write_in_lanes(program: Program, chunks, lanes: int, report: ImportReport, skip_invalid: bool, progress):
    """Write `chunks` ((lane, chunk)) with a thread per lane, each on its own database connection, while this thread
    reads and prepares them, at most two chunks ahead of each lane. A lane that fails stops the others after their
    chunk under way; its error is raised here. Each lane reports on its own; the reports are added up here."""
    handoffs = [queue.Queue(maxsize=2) for _ in range(lanes)]
    reports = [ImportReport() for _ in range(lanes)]
    stop, heard = threading.Event(), threading.Lock()

    def write(lane: int) -> None:
        try:
            with batch_statements():
                while not stop.is_set():
                    try:
                        chunk = handoffs[lane].get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if chunk is _DONE:
                        return
                    chunk_write(program=program, chunk=chunk, report=reports[lane], skip_invalid=skip_invalid)
                    with heard:
                        progress("import", chunk.size)
        except BaseException:
            stop.set()
            raise
        finally:
            connection.close()

    with ThreadPoolExecutor(lanes, thread_name_prefix="import-lane") as pool:
        writing = [pool.submit(write, lane) for lane in range(lanes)]
        try:
            for lane, chunk in chunks:
                if not _put(handoffs[lane], chunk, stop):
                    break
            for handoff in handoffs:
                _put(handoff, _DONE, stop)
            failures = [lane.exception() for lane in writing]
        except BaseException:  # the reader failed, or an interrupt came
            stop.set()
            raise
    failures = [f for f in failures if f is not None]
    if unexpected := [f for f in failures if not isinstance(f, ImportAborted)]:
        raise unexpected[0]
    if failures:  # the row at the earliest line that stopped a lane, as one lane would have stopped at it
        raise min(failures, key=lambda f: f.extra["line"])
    for part in reports:
        report.add(part)


_DONE = object()


def _put(handoff: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand `item` over, waiting for room unless `stop` is set first; whether it was handed over."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _ahead(chunks: Iterator, depth: int = 2) -> Iterator:
    """Runs `chunks` on a thread, up to `depth` chunks ahead, so the file is read and the points worked out while
    the database writes the chunk before (the database driver lets go of the interpreter while it waits). The
    thread touches no database; an error in it is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for chunk in chunks:
                if not _put(handoff, chunk, stop):
                    return
            _put(handoff, _DONE, stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(handoff, exc, stop)

    thread = threading.Thread(target=produce, name="import-reader", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
