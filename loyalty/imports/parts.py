"""A large import file checked in parts (checking.file_check), each but the first in a process forked for it, at
once: the check pass is Python's work, one core's at a time. Each part's process spools its rows and hands what it
found back pickled; its progress comes through a pipe."""

import contextlib
import logging
import os
import pickle
import signal
import tempfile
from dataclasses import dataclass

from django.db import connection, connections

from core.db import batch_statements
from loyalty.imports.files import PartMisjudged
from loyalty.imports.report import ImportReport

logger = logging.getLogger(__name__)


@dataclass
class _Part:
    """A part checked by a forked process: its id, the pipe it reports its progress on, the temporary files it
    spools its rows to and pickles its result to, and the progress it reported before its start was known to fall
    between rows (a part started inside a quoted field would count each of its lines as a row)."""

    pid: int
    progress: int
    spool: object
    result: object
    held: int | None = 0  # None once its progress is told as it comes


def parts_check(check, parser, parts, batch_size, progress, earnings, stack) -> tuple | None:
    """The first part checked here with `check` (checking._check), the others each in a forked process at once;
    (what they found together, their spools in file order, their report), or None where a part did not end between
    rows, or a process could not be forked. The processes are ended and reaped whatever happens."""
    forked: list[_Part] = []
    try:
        for part in parts[1:]:
            spool = stack.enter_context(tempfile.TemporaryFile(prefix="import-"))
            result = stack.enter_context(tempfile.TemporaryFile(prefix="import-check-"))
            heard, says = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                logger.warning("Could not fork to check part of an import file; checking it in one process.")
                os.close(heard)
                os.close(says)
                return None
            if pid == 0:  # never returns
                _part_process(check, parser, part, batch_size, earnings, spool, result, says)
            forked.append(_Part(pid, heard, spool, result))
            os.close(says)
            os.set_blocking(heard, False)

        def relay(stage: str, count: int) -> None:
            progress(stage, count)
            for other in forked:
                _relay(other, progress)

        spool = stack.enter_context(tempfile.TemporaryFile(prefix="import-"))
        report = ImportReport()
        try:
            checked = check(parser, parts[0], batch_size, report, relay, earnings, spool)
        except PartMisjudged:
            return None
        spools = [spool]
        for other in forked:  # its start is known now to fall between rows: the part before it ended there
            if other.held:
                progress("check", other.held)
            other.held = None
            os.set_blocking(other.progress, True)
            while _relay(other, progress):
                pass
            _, status = os.waitpid(other.pid, 0)
            other.pid = 0
            other.result.seek(0)
            try:
                outcome = pickle.load(other.result)
            except (EOFError, pickle.UnpicklingError):  # it ended before it could say how: killed, say
                code = os.waitstatus_to_exitcode(status)
                how = f"by signal {-code}" if code < 0 else f"with exit code {code}"
                outcome = RuntimeError(f"The process checking part of the file ended {how}, without a result.")
            if isinstance(outcome, PartMisjudged):
                return None
            if isinstance(outcome, BaseException):
                raise outcome
            found, part_report = outcome
            checked.then(found)
            report.add(part_report)
            other.spool.seek(0)
            spools.append(other.spool)
        return checked, spools, report
    finally:
        for other in forked:
            os.close(other.progress)
            if other.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other.pid, signal.SIGTERM)
                os.waitpid(other.pid, 0)


def _relay(part: _Part, progress) -> bool:
    """Hand on the progress `part` has reported, or hold it; False once it has ended (or has nothing more now)."""
    try:
        said = os.read(part.progress, 4096)
    except BlockingIOError:
        return False
    for at in range(0, len(said), 4):
        count = int.from_bytes(said[at : at + 4], "little")
        if part.held is None:
            progress("check", count)
        else:
            part.held += count
    return bool(said)


def _part_process(check, parser, part, batch_size, earnings, spool, result, says: int):
    """In a forked process: check `part`, spool its rows, pickle (what it found, its report) or the error it met to
    `result`, and end without running anything of the parent's (no exit handlers, no finalisers)."""
    # The parent's database connections are the parent's: forgotten first of all, never closed (closing would end
    # the parent's session), and new ones opened as needed.
    for alias in connections:
        connections[alias].connection = None
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with batch_statements():
            report = ImportReport()
            checked = check(
                parser, part, batch_size, report, lambda stage, count: os.write(says, count.to_bytes(4, "little")),
                earnings, spool,
            )  # fmt: skip
            spool.flush()
            pickle.dump((checked, report), result, pickle.HIGHEST_PROTOCOL)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            pickle.loads(said := pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))  # it must come back whole
        except Exception:  # noqa: BLE001 - an error that does not pickle
            said = pickle.dumps(RuntimeError(f"Checking part of the file: {exc!r}"), pickle.HIGHEST_PROTOCOL)
        result.write(said)
    finally:
        with contextlib.suppress(BaseException):
            result.flush()
            connection.close()
        os._exit(code)
