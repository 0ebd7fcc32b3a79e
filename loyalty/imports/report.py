"""What an import reports, and the errors it raises."""

import bisect
from dataclasses import dataclass, field

from core.errors import ApplicationError, InvalidInput

MAX_ERRORS_KEPT = 1000


class ImportFileInvalid(InvalidInput):
    code, title = "import_file_invalid", "The import file cannot be read"


class ImportAborted(ApplicationError):
    status, code, title = 422, "import_aborted", "The import stopped at a row the database refused"


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


@dataclass
class ImportReport:
    read: int = 0
    imported: int = 0
    already_present: int = 0
    invalid: int = 0
    points_credited: int = 0
    points_reversed: int = 0
    seconds: float = 0.0
    errors: list[RowError] = field(default_factory=list)  # those of the lowest lines, at most MAX_ERRORS_KEPT

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0

    def add_error(self, line: int, name: str, message: str, *, new_row: bool = True) -> None:
        """Count the row and keep the error, in line order, among the MAX_ERRORS_KEPT of the lowest lines. Errors
        mostly come in file order; some come later for earlier lines (a return checked once the whole file is read,
        a row refused while writing), and must not be lost behind a thousand later ones."""
        self.invalid += new_row
        error = RowError(line, name, message)
        if len(self.errors) < MAX_ERRORS_KEPT and (not self.errors or line >= self.errors[-1].line):
            self.errors.append(error)
            return
        at = bisect.bisect_right(self.errors, line, key=lambda kept: kept.line)  # after the line's errors kept
        if at < MAX_ERRORS_KEPT:
            self.errors.insert(at, error)
            del self.errors[MAX_ERRORS_KEPT:]

    def add(self, other: "ImportReport") -> None:
        """Add `other`'s counts and errors (another lane's, or another part of the file's) to these, the errors kept as
        add_error keeps them."""
        self.read += other.read
        self.imported += other.imported
        self.already_present += other.already_present
        self.invalid += other.invalid
        self.points_credited += other.points_credited
        self.points_reversed += other.points_reversed
        # Both lists are in line order; a stable sort keeps each line's errors in the order they were found.
        self.errors = sorted(self.errors + other.errors, key=lambda error: error.line)[:MAX_ERRORS_KEPT]
