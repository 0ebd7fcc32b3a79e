"""Entry.refund_of: unique only where set (a partial unique index), so the entries that refund nothing, nearly all,
are not in the index.

On PostgreSQL the index is built CONCURRENTLY and the old unique constraint dropped after it: entries stay
readable and writable while it builds (Django's own operations would take the table's exclusive lock for a scan
and a build, and check the foreign key of every entry again). The foreign key itself is left as it is. On SQLite
(the embedded default) the index is added and the old constraint left, which allows any number of NULLs as well."""

import django.db.models.deletion
from django.db import migrations, models

_INDEX = "entry_refunded_once"
_OLD = "loyalty_entry_refund_of_id_key"


def _forwards(apps, schema_editor):
    concurrently = "CONCURRENTLY IF NOT EXISTS" if schema_editor.connection.vendor == "postgresql" else "IF NOT EXISTS"
    schema_editor.execute(
        f"CREATE UNIQUE INDEX {concurrently} {_INDEX} ON loyalty_entry (refund_of_id) WHERE refund_of_id IS NOT NULL"
    )
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE loyalty_entry DROP CONSTRAINT IF EXISTS {_OLD}")


def _backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE loyalty_entry ADD CONSTRAINT {_OLD} UNIQUE (refund_of_id)")
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {_INDEX}")
    else:
        schema_editor.execute(f"DROP INDEX IF EXISTS {_INDEX}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("loyalty", "0019_member_event_qualifying"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="entry",
                    name="refund_of",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="refunded_by",
                        to="loyalty.entry",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="entry",
                    constraint=models.UniqueConstraint(
                        condition=models.Q(("refund_of__isnull", False)), fields=("refund_of",), name=_INDEX
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(_forwards, _backwards)],
        ),
    ]
