"""`manage.py import_transactions FILE`: bulk import of purchases and returns from CSV or JSON lines."""

import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from tqdm import tqdm

from core.errors import ApplicationError
from core.models import Program
from loyalty.imports import TransactionFile, transactions_import

ERRORS_SHOWN = 50


class Command(BaseCommand):
    help = (
        "Import purchases and returns from a CSV file (header: store, external_id, channel, member, type, "
        "original_external_id, occurred_at, currency, total) or JSON lines (the same fields, plus optional lines). "
        "Rows already recorded are skipped, so a rerun imports nothing twice. A file with a bad row imports nothing "
        "unless --skip-invalid is given. Each member's rows are written in file order, members in an order of the "
        "import's own (lanes of members at once, each one's read-ahead grouped by member). The file is read once "
        "(a large one in IMPORT_CHECKERS parts at once); its checked rows wait in temporary files in TMPDIR (about "
        "three times a CSV file's size) until they are written, and they are removed when the import ends."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="The file to import (.csv, .jsonl or .ndjson).")
        parser.add_argument(
            "--format", choices=["csv", "jsonl"], help="The file's format, when its extension does not tell."
        )
        parser.add_argument("--program", default="DEFAULT", help="The programme's code (default DEFAULT).")
        parser.add_argument(
            "--batch-size", type=int, default=5000, help="Rows per database transaction (default 5000)."
        )
        parser.add_argument(
            "--writers",
            type=int,
            help="Lanes of members written at once, each on its own database connection (default IMPORT_WRITERS).",
        )
        parser.add_argument("--skip-invalid", action="store_true", help="Report bad rows and import the rest.")
        parser.add_argument("--no-progress", action="store_true", help="No progress bar.")

    def handle(
        self,
        *args,
        file: str,
        format: str | None,
        program: str,
        batch_size: int,
        writers: int | None,
        skip_invalid: bool,
        **options,
    ):
        if connection.vendor != "postgresql":  # the bulk path writes with COPY and arrays, which SQLite lacks
            raise CommandError(
                "import_transactions needs PostgreSQL (set DATABASE_URL=postgres://...); on the embedded SQLite "
                "default, record transactions through the API (POST /api/v1/transactions) instead."
            )
        if not 1 <= batch_size <= 100_000:
            raise CommandError("--batch-size must be between 1 and 100000.")
        if writers is not None and not 1 <= writers <= 16:
            raise CommandError("--writers must be between 1 and 16.")
        found = Program.objects.filter(code=program).first()
        if found is None:
            known = ", ".join(Program.objects.order_by("code").values_list("code", flat=True))
            raise CommandError(f"No programme {program!r}; known: {known}.")
        bars: dict[str, tqdm] = {}

        def progress(stage: str, count: int) -> None:
            if stage not in bars:
                for bar in bars.values():
                    bar.close()
                label = {"check": "checking", "import": "importing"}[stage]
                # The raw stream: the command's OutputWrapper would end each of tqdm's redraws with a newline.
                bars[stage] = tqdm(desc=label, unit=" rows", disable=options["no_progress"], file=sys.stderr)
            bars[stage].update(count)

        try:
            report = transactions_import(
                program=found,
                rows=TransactionFile(file, fmt=format),
                batch_size=batch_size,
                skip_invalid=skip_invalid,
                progress=progress,
                writers=writers,
            )
        except ApplicationError as exc:
            raise CommandError(exc.detail) from exc
        finally:
            for bar in bars.values():
                bar.close()

        for error in report.errors[:ERRORS_SHOWN]:
            self.stderr.write(str(error))
        if len(report.errors) > ERRORS_SHOWN:
            self.stderr.write(f"... and more errors, in {report.invalid} invalid rows in all.")
        self.stdout.write(
            f"read {report.read}, imported {report.imported}, already present {report.already_present}, "
            f"invalid {report.invalid}, points credited {report.points_credited}, "
            f"points reversed {report.points_reversed}, {report.rows_per_second:,.0f} rows/s"
        )
        if report.invalid and not skip_invalid:
            raise CommandError(
                f"{report.invalid} invalid row(s); nothing was imported. Fix them, or rerun with --skip-invalid "
                "to import the rest."
            )
