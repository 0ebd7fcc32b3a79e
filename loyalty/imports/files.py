"""Reading import files: a CSV or JSON-lines file as (line number, fields), read whole, or in parts that several
processes read at once (TransactionFile.parts), each as the whole file's reading reads it there."""

import csv
import io
import itertools
import json
import mmap
import secrets
from collections.abc import Iterator
from decimal import Decimal
from operator import itemgetter
from pathlib import Path

from loyalty.imports.report import ImportFileInvalid

FIELDS = (
    "store",
    "external_id",
    "channel",
    "member",
    "type",
    "original_external_id",
    "occurred_at",
    "currency",
    "total",
)
OPTIONAL_FIELDS = ("lines", "original_store")
# A row's fields in this order where they come as a tuple, as a CSV file's rows do (RowParser.parse).
COLUMNS = FIELDS + OPTIONAL_FIELDS
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PartMisjudged(Exception):
    """A part of a CSV file did not end between two rows: a quoted field ran on past its end."""


class TransactionFile:
    """A CSV or JSON-lines file of transactions. Each iteration reads it afresh and yields (line number, fields);
    the header and the encoding are checked when it is opened, so a bad file is refused before anything is read."""

    def __init__(self, path: str | Path, *, fmt: str | None = None):
        self.path = Path(path)
        self.fmt = fmt or FORMATS.get(self.path.suffix.lower())
        self.header: list[str] | None = None
        if self.fmt not in ("csv", "jsonl"):
            raise ImportFileInvalid(f"{self.path}: give --format csv or jsonl; the extension does not tell.")
        if not self.path.is_file():
            raise ImportFileInvalid(f"{self.path}: no such file.")
        if self.fmt == "csv":
            try:
                with self.path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
                    header = self.header = next(csv.reader(f), None)
            except UnicodeDecodeError:
                raise self._not_utf8() from None
            if header is None:
                raise ImportFileInvalid(f"{self.path}: the file is empty; a CSV file starts with its header.")
            missing = [name for name in FIELDS if name not in header]
            unknown = [name for name in header if name not in FIELDS + OPTIONAL_FIELDS]
            if missing or unknown:
                raise ImportFileInvalid(
                    f"{self.path}: the header "
                    + "; ".join(
                        part
                        for part in (
                            f"lacks {', '.join(missing)}" if missing else "",
                            f"has unknown columns {', '.join(unknown)}" if unknown else "",
                        )
                        if part
                    )
                    + f". Expected: {','.join(FIELDS)} (optionally {', '.join(OPTIONAL_FIELDS)})."
                )

    def __iter__(self) -> Iterator[tuple[int, dict | None]]:
        return iter(FilePart(self, 0, None, 0))

    def parts(self, count: int) -> list["FilePart"]:
        """The file in at most `count` parts of about equal size, cut after a line end; fewer where no cut is found
        near a part's end. A CSV file is cut where the quotes before are even, which is between two rows in a file
        written as RFC 4180 has it: a quote begins or ends a quoted field, or is one of a doubled pair within one.
        A stray quote in an unquoted field would mislead that count, so each part but the last checks, at its end,
        that it ended between rows (PartMisjudged otherwise)."""
        with self.path.open("rb") as f:
            size = self.path.stat().st_size
            if count < 2 or size == 0:
                return [FilePart(self, 0, None, 0)]
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                cuts = self._cuts(data, [size * k // count for k in range(1, count)])
        starts = [(0, 0), *cuts]
        ends = [start for start, _ in cuts] + [None]
        return [FilePart(self, start, end, lines) for (start, lines), end in zip(starts, ends, strict=True)]

    def _cuts(self, data: mmap.mmap, targets: list[int]) -> list[tuple[int, int]]:
        """(byte offset, lines before it) of a cut at the first suitable line end at or after each target, before
        the next target."""
        cuts: list[tuple[int, int]] = []
        counted, quotes, lines = 0, 0, 0  # quotes and lines in data[:counted]
        first = data.find(b"\n") + 1  # after the header, for a CSV file
        for target, limit in zip(targets, targets[1:] + [len(data)], strict=True):
            end = data.find(b"\n", max(target, first, counted))
            # Not far past the target: after a stray quote every line end's count is odd to the end of the file.
            limit = min(limit, max(target, first, counted) + _SEARCHED)
            while 0 <= end < limit - 1:
                quotes += _count(data, counted, end + 1, b'"') if self.fmt == "csv" else 0
                lines += _lines(data, counted, end + 1)
                counted = end + 1
                if quotes % 2 == 0:
                    cuts.append((counted, lines))
                    break
                end = data.find(b"\n", counted)
        return cuts

    def _not_utf8(self, start: int = 0) -> ImportFileInvalid:
        """The error for a file not in UTF-8, naming the first bad byte at or after `start`."""
        with self.path.open("rb") as f:
            f.seek(start)
            offset, pending = start, b""
            while block := f.read(1 << 20):
                data = pending + block
                try:
                    data.decode()
                    offset, pending = offset + len(data), b""
                except UnicodeDecodeError as exc:
                    if exc.end == len(data) and exc.reason == "unexpected end of data":  # a character cut in two
                        offset, pending = offset + exc.start, data[exc.start :]
                        continue
                    return ImportFileInvalid(f"{self.path}: not UTF-8 ({exc.reason} at byte {offset + exc.start}).")
        return ImportFileInvalid(f"{self.path}: not UTF-8 (a character cut short at byte {offset}).")


class FilePart:
    """Bytes [start, end) of a TransactionFile (to its end where `end` is None), whose rows it yields with their line
    numbers in the whole file (`lines_before` lines come before it)."""

    def __init__(self, file: TransactionFile, start: int, end: int | None, lines_before: int):
        self.file, self.start, self.end, self.lines_before = file, start, end, lines_before

    def __iter__(self) -> Iterator[tuple[int, dict | None]]:
        file = self.file
        try:
            with file.path.open("rb") as raw:
                raw.seek(self.start)
                stream = raw if self.end is None else io.BufferedReader(_Slice(raw, self.end - self.start))
                # -sig: spreadsheets write a BOM. newline="": a quoted CSV field may hold line ends of any kind.
                with io.TextIOWrapper(stream, encoding="utf-8-sig" if self.start == 0 else "utf-8", newline="") as f:
                    yield from self._csv(f) if file.fmt == "csv" else self._jsonl(f)
        except UnicodeDecodeError:
            raise file._not_utf8(self.start) from None
        except csv.Error as exc:
            if self.end is not None:  # perhaps cut inside a quoted field: read again, whole
                raise PartMisjudged from exc
            raise ImportFileInvalid(f"{file.path}: not valid CSV ({exc}).") from exc

    def _csv(self, f) -> Iterator[tuple[int, tuple]]:
        # A part that ends between rows reads the line after it as a row of its own; one cut inside a quoted field
        # reads it into that field.
        last = None if self.end is None else secrets.token_hex(16)
        reader = csv.reader(f if last is None else itertools.chain(f, [last + "\n"]))
        header = next(reader) if self.start == 0 else self.file.header
        width, before = len(header), self.lines_before
        # Each row as a tuple of COLUMNS, an optional column the file lacks as an empty cell: a dict a row cost
        # three times as much. (A column named twice: the later one, as a dict would keep it.)
        at = {name: i for i, name in enumerate(header)}
        pick = itemgetter(*(at.get(name, width) for name in COLUMNS))
        padded = not at.keys() >= set(COLUMNS)
        for values in reader:
            if not values:
                continue
            if len(values) == 1 and values[0] == last:
                return
            if len(values) != width:
                yield before + reader.line_num, None  # reported as a row error by the parser
                continue
            if padded:
                values.append("")
            yield before + reader.line_num, pick(values)
        if last is not None:
            raise PartMisjudged

    def _jsonl(self, f) -> Iterator[tuple[int, dict | None]]:
        for number, text in enumerate(f, start=self.lines_before + 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text, parse_float=Decimal)  # 12.30 stays 12.30, not a float
            except ValueError:
                value = None
            yield number, value if isinstance(value, dict) else None


class _Slice(io.RawIOBase):
    """The next `size` bytes of a binary file."""

    def __init__(self, raw, size: int):
        self.raw, self.left = raw, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(memoryview(buffer)[: min(len(buffer), self.left)])
        self.left -= count
        return count


_STEP = 1 << 23  # bytes counted at a time
_SEARCHED = 1 << 20  # bytes after a part's target end searched for a cut


def _count(data: mmap.mmap, start: int, end: int, what: bytes) -> int:
    """Occurrences of the byte `what` in data[start:end]."""
    return sum(data[at : min(at + _STEP, end)].count(what) for at in range(start, end, _STEP))


def _lines(data: mmap.mmap, start: int, end: int) -> int:
    """Line ends in data[start:end], as a text file read with newline="" counts them: \\n, \\r\\n or \\r alone.
    `end` falls after a \\n."""
    pairs = sum(data[at : min(at + _STEP + 1, end)].count(b"\r\n") for at in range(start, end, _STEP))
    return _count(data, start, end, b"\n") + _count(data, start, end, b"\r") - pairs
