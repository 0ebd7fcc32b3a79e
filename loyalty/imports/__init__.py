"""Bulk import of purchases and returns from CSV or JSON-lines files, set-based: a chunk of rows costs a fixed
handful of statements, not a few per row, and ends in the same ledger as recording each row with
transaction_record."""

from loyalty.imports.files import FIELDS, OPTIONAL_FIELDS, TransactionFile
from loyalty.imports.report import ImportAborted, ImportFileInvalid, ImportReport, RowError
from loyalty.imports.service import transactions_import

__all__ = [
    "FIELDS",
    "OPTIONAL_FIELDS",
    "ImportAborted",
    "ImportFileInvalid",
    "ImportReport",
    "RowError",
    "TransactionFile",
    "transactions_import",
]
