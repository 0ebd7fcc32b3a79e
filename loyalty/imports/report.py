"""What an import reports, and the errors it raises."""

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
    errors: list[RowError] = field(default_factory=list)  # the first MAX_ERRORS_KEPT

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0

    def add_error(self, line: int, name: str, message: str, *, new_row: bool = True) -> None:
        self.invalid += new_row
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(RowError(line, name, message))
