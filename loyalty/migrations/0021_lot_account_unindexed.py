"""Lot.account without an index of its own: the lookups of an account's lots are of those with points left, which
the partial lot_spendable index serves, and an index entry for every lot cost each credit 1.0-1.3 µs of the
database's CPU (docs/benchmarks.md, fifteenth round).

On PostgreSQL the index is dropped CONCURRENTLY: lots stay readable and writable meanwhile (a plain DROP INDEX
waits for the table's exclusive lock, and every query on lots queues behind it). The backwards step builds it again
CONCURRENTLY. On SQLite (the embedded default) it is dropped and built plainly."""

import django.db.models.deletion
from django.db import migrations, models

_INDEX = "loyalty_lot_account_id_49a23775"  # the name Django gave the foreign key's index


def _concurrently(schema_editor) -> str:
    return "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""


def _forwards(apps, schema_editor):
    schema_editor.execute(f"DROP INDEX {_concurrently(schema_editor)}IF EXISTS {_INDEX}")


def _backwards(apps, schema_editor):
    # Dropped first: an interrupted CREATE INDEX CONCURRENTLY leaves an invalid index behind, which IF NOT EXISTS
    # would take for the index, and a rerun would then leave it unusable.
    _forwards(apps, schema_editor)
    schema_editor.execute(f"CREATE INDEX {_concurrently(schema_editor)}{_INDEX} ON loyalty_lot (account_id)")


class Migration(migrations.Migration):
    atomic = False  # DROP INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("loyalty", "0020_entry_refunded_once"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="lot",
                    name="account",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="lots",
                        to="loyalty.account",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(_forwards, _backwards)],
        ),
    ]
