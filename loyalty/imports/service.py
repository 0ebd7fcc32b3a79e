"""transactions_import: check the whole file, then import it chunk by chunk, in lanes of members written at once."""

import contextlib
import gc
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter

from django.conf import settings
from django.db import connection
from django.utils import timezone

from core.db import batch_statements
from core.models import Program
from loyalty.imports.checking import Checked, file_check, spool_read, uncommitted_work
from loyalty.imports.report import ImportAborted, ImportReport
from loyalty.imports.rows import RowParser
from loyalty.imports.writing import Earnings, Prepared, chunk_write


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
    rest (the check pass: loyalty.imports.checking, a large file in settings.IMPORT_CHECKERS processes at once). The
    good rows, made ready to write on the way, wait in temporary files (the spools, about three times the size of a
    CSV file), from which they are imported in chunks of `batch_size`, each chunk one database transaction whose ledger
    credits lock their accounts in key order. `progress(stage, rows)` hears of each chunk ("check", "import").

    Written in `writers` lanes at once (settings.IMPORT_WRITERS), each on its own database connection: a member's
    rows, and the returns of their purchases, all go to one lane, in file order, so lanes never wait for each other's
    accounts, and the database works on one lane's chunk while Python makes the next. One lane inside a caller's
    database transaction or with autocommit off (other connections would not see its uncommitted rows), and where
    an external id names purchases of several members in the file or the database, whose returns could not be told
    apart beforehand."""
    started = time.perf_counter()
    report = ImportReport()
    progress = progress or (lambda stage, count: None)
    now = timezone.now()
    with _collector_off(), contextlib.ExitStack() as stack:
        parser, earnings, processes = RowParser(program, now), Earnings(program, now), settings.IMPORT_CHECKERS
        checked, spools = file_check(parser, rows, batch_size, report, progress, earnings, processes, stack)
        if not report.invalid or skip_invalid:
            writers = settings.IMPORT_WRITERS if writers is None else writers
            lanes = 1 if checked.owners is None or uncommitted_work() else max(1, writers)
            chunks = _spooled(spools, checked, batch_size, lanes)
            if lanes == 1:
                for _, chunk in _ahead(chunks):
                    chunk_write(program=program, chunk=chunk, report=report, skip_invalid=skip_invalid)
                    progress("import", chunk.size)
            else:
                _write_in_lanes(program, chunks, lanes, batch_size, report, skip_invalid, progress)
    report.seconds = time.perf_counter() - started
    return report


_collector = {"lock": threading.Lock(), "users": 0, "enabled": True}


@contextlib.contextmanager
def _collector_off():
    """Python's cycle collector off while imports run. An import allocates a few dozen objects a row, nearly all
    freed as soon as made and none in cycles; yet a collection each 700 of them cost a quarter of the import's
    Python time, and one each 70,000 still 0.24 s of a 200,000-row import, every one with the interpreter held and
    the lanes waiting for it (measured on the benchmark's file). The few cycles an import leaves (a chunk's
    exceptions and cursors) wait for the first collection after it. The collector comes back as it was when the
    last import running in the process ends."""
    with _collector["lock"]:
        if not _collector["users"]:
            _collector["enabled"] = gc.isenabled()
            gc.disable()
        _collector["users"] += 1
    try:
        yield
    finally:
        with _collector["lock"]:
            _collector["users"] -= 1
            if not _collector["users"] and _collector["enabled"]:
                gc.enable()


# The rows of a lane read ahead and put in order of their members before they are cut into chunks (_spooled); at
# least two chunks' worth. The more, the fewer chunks a member's rows are spread over: in the benchmark's file (about
# ten purchases a member, spread through it), 100,000 left half the (account, chunk) pairs that 40,000 did.
GROUPED_ROWS = 100_000


def _spooled(spools: list, checked: Checked, batch_size: int, lanes: int) -> Iterator[tuple[int, Prepared]]:
    """(lane, chunk) for each chunk of at most `batch_size` rows of one lane from `spools` (in file order); returns
    found bad after they were spooled (checking._returns_check) are left out.

    Each lane's rows are read GROUPED_ROWS ahead and put in order of their owner (the member, or the external
    id of an anonymous purchase), each owner's rows in file order, before they are cut into chunks: a chunk then
    holds fewer members, and every member a chunk holds costs the database an account to open, lock and update (and
    a check that the member is still active), whatever number of rows it has. Rows of different owners are
    independent, so their order between chunks is free; where owners are not known (one lane for lack of them)
    the rows stay in file order.

    A chunk writes its purchases before its returns, so a purchase of a member whom a return in the chunk reaches
    starts a new chunk: that member's rows then reach the ledger in file order, as on the per-row path (under the
    available-only return policy a return takes what its member has before the purchases after it). Where who a
    return reaches is not known, any purchase after a return does."""
    grouped = checked.owners is not None
    # The first time two chunks' worth, so that the lanes start early, then GROUPED_ROWS (at least a chunk's worth).
    most = max(GROUPED_ROWS, 2 * batch_size) if grouped else 2 * batch_size
    ahead = [2 * batch_size] * lanes
    waiting: list[list] = [[] for _ in range(lanes)]  # (owner, row) of each lane, not yet cut into chunks
    for ready in _unspooled(spools):
        for item in ready:
            if type(item) is tuple:  # a purchase: (line, (store, external_id), member number, ...)
                owner = item[2] or item[1][1]
            elif item.line in checked.bad:
                continue
            else:  # a return, with the purchase it returns: the same accounts, the purchase's row locked
                owner = checked.owners.get(item.original_external_id, item.member) if grouped else None
            lane = lane_of(owner, lanes) if lanes > 1 else 0
            rows = waiting[lane]
            rows.append((owner, item))
            if len(rows) >= ahead[lane]:
                waiting[lane] = yield from _cut(lane, rows, batch_size, grouped, last=False)
                ahead[lane] = most
    for lane, rows in enumerate(waiting):
        yield from _cut(lane, rows, batch_size, grouped, last=True)


def lane_of(owner: str, lanes: int) -> int:
    """The lane of `owner`'s rows (a member number, or the external id of a purchase without a member)."""
    return zlib.crc32(owner.encode()) % lanes


def _cut(lane: int, rows: list, batch_size: int, grouped: bool, *, last: bool):
    """Chunks of `rows` ((owner, row) of one lane, in file order), ordered by owner if `grouped` (_by_owner);
    returns the rows left over for the next chunk, unless `last`, where they are a chunk of their own."""
    if grouped:
        rows[:] = _by_owner(rows)
    chunk: list = []
    returned: set = set()  # the owners the chunk's returns reach
    for owner, item in rows:
        if type(item) is not tuple:
            returned.add(owner)
        elif returned and (owner in returned or None in returned):
            yield lane, _prepared(chunk)
            chunk, returned = [], set()
        chunk.append(item)
        if len(chunk) == batch_size:
            yield lane, _prepared(chunk)
            chunk, returned = [], set()
    if last and chunk:
        yield lane, _prepared(chunk)
        return []
    return rows[len(rows) - len(chunk) :] if chunk else []  # the unfinished chunk's rows wait for the next ones


def _by_owner(rows: list) -> list:
    """`rows` ((owner, row), in file order) by owner, each owner's in file order. Where there are returns, an
    owner's purchases after a return of theirs go to a later round (all owners' first rounds, then the second
    ones, ...): a chunk must be cut before such a purchase (_cut), and so it is cut once a round, not once an
    owner."""
    if all(type(item) is tuple for _, item in rows):  # purchases only, as most files are
        return sorted(rows, key=itemgetter(0))  # stable
    rounds: dict = {}
    returned: set = set()  # owners whose last row so far is a return
    keys = []
    for owner, item in rows:
        if type(item) is not tuple:
            returned.add(owner)
        elif owner in returned:
            returned.discard(owner)
            rounds[owner] = rounds.get(owner, 0) + 1
        keys.append((rounds.get(owner, 0), owner))
    return [row for _, row in sorted(zip(keys, rows, strict=True), key=itemgetter(0))]


def _unspooled(spools: list) -> Iterator[list]:
    """What file_check spooled to `spools`, a chunk of rows at a time."""
    for spool in spools:
        yield from spool_read(spool)


def _prepared(items: list) -> Prepared:
    purchases = [item for item in items if type(item) is tuple]
    return Prepared(purchases, [item for item in items if type(item) is not tuple], len(items))


def _write_in_lanes(
    program: Program, chunks, lanes: int, batch_size: int, report: ImportReport, skip_invalid: bool, progress
):
    """Write `chunks` ((lane, chunk)) with a thread per lane, each on its own database connection, while this thread
    reads and prepares them, ahead of each lane by as many rows as _spooled reads ahead and a few chunks more: those
    come at once. A lane that fails stops the others after their chunk under way; its error is raised here. Each
    lane reports on its own; the reports are added up here."""
    handoffs = [queue.Queue(maxsize=GROUPED_ROWS // batch_size + 2) for _ in range(lanes)]
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
