"""transactions_import: check the whole file, then import it chunk by chunk."""

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from django.utils import timezone

from core.db import batch_statements
from core.models import Program
from loyalty.imports.report import ImportReport
from loyalty.imports.rows import Row, RowInvalid, RowParser
from loyalty.imports.writing import Earnings, Prepared, chunk_prepare, chunk_write, members_resolve
from loyalty.models import Transaction
from members.models import Member


@batch_statements()
def transactions_import(
    *,
    program: Program,
    rows: Iterable[tuple[int, dict | None]],
    batch_size: int = 5000,
    skip_invalid: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> ImportReport:
    """Import purchases and returns, each row as transaction_record would record it. Idempotent on (store,
    external_id): a rerun imports nothing twice. `rows` ((line number, fields), e.g. a TransactionFile) is read
    twice: first every row is checked, and if one is bad nothing is written, unless `skip_invalid`, which imports
    the rest; then rows are imported in chunks of `batch_size`, each chunk one database transaction whose ledger
    credits lock their accounts in key order. `progress(stage, rows)` hears of each chunk ("check", "import")."""
    if iter(rows) is rows:
        raise TypeError("rows is read twice: give a TransactionFile or a list, not an iterator.")
    started = time.perf_counter()
    report = ImportReport()
    progress = progress or (lambda stage, count: None)
    parser = RowParser(program, timezone.now())
    bad_lines = _check(parser, rows, batch_size, report, progress)
    if not report.invalid or skip_invalid:
        for chunk in _ahead(_prepared(parser, rows, bad_lines, batch_size, Earnings(program))):
            chunk_write(program=program, chunk=chunk, report=report, skip_invalid=skip_invalid)
            progress("import", chunk.size)
    report.seconds = time.perf_counter() - started
    return report


def _check(parser: RowParser, rows, batch_size: int, report: ImportReport, progress) -> set[int]:
    """The first reading: every row parsed and checked, members resolved a chunk at a time. Returns the bad lines."""
    bad: set[int] = set()
    purchases_seen: set[str] = set()
    unmatched_returns: list[Row] = []
    chunk: list[Row] = []

    def members_check():
        found = members_resolve(parser.program, {row.member for row in chunk if row.member})
        for row in chunk:
            if not row.member:
                continue
            status = found.get(row.member, (None, None))[1]
            if status is None:
                message = f"No member {row.member} in programme {parser.program.code}."
            elif status != Member.Status.ACTIVE and row.kind == Transaction.Kind.PURCHASE:
                message = f"Member {row.member} is {status}."
            else:
                continue
            bad.add(row.line)
            report.add_error(row.line, "member", message)
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
        if row.kind == Transaction.Kind.PURCHASE:
            purchases_seen.add(row.external_id)
        elif row.original_external_id not in purchases_seen:
            unmatched_returns.append(row)
        chunk.append(row)
        if len(chunk) == batch_size:
            members_check()
    members_check()
    _returns_check(parser.program, unmatched_returns, batch_size, bad, report)
    return bad


def _returns_check(program: Program, returns: list[Row], batch_size: int, bad: set[int], report: ImportReport):
    """A return must follow its purchase in the file, or its purchase must be recorded already."""
    for start in range(0, len(returns), batch_size):
        part = returns[start : start + batch_size]
        known = set(
            Transaction.objects.filter(
                program=program,
                kind=Transaction.Kind.PURCHASE,
                external_id__in={row.original_external_id for row in part},
            ).values_list("external_id", flat=True)
        )
        for row in part:
            if row.original_external_id not in known and row.line not in bad:
                bad.add(row.line)
                report.add_error(
                    row.line, "original_external_id", "No such purchase, neither recorded nor earlier in the file."
                )


def _prepared(parser: RowParser, rows, bad_lines: set[int], batch_size: int, earnings: Earnings) -> Iterator[Prepared]:
    chunk: list[Row] = []
    for number, raw in rows:
        if number in bad_lines:
            continue
        chunk.append(parser.convert(number, raw))
        if len(chunk) == batch_size:
            yield chunk_prepare(chunk, earnings)
            chunk = []
    if chunk:
        yield chunk_prepare(chunk, earnings)


_DONE = object()


def _ahead(chunks: Iterator[Prepared], depth: int = 2) -> Iterator[Prepared]:
    """Runs `chunks` on a thread, up to `depth` chunks ahead, so the file is read and the points worked out while
    the database writes the chunk before (the database driver lets go of the interpreter while it waits). The
    thread touches no database; an error in it is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

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
