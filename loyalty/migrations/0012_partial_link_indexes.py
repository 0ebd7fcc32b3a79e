"""Index four nullable links only where they are set: Transaction.original and .api_client, Entry.staff_user and
.api_client. Most rows leave them empty (purchases have no original, imported and API rows no staff user, imported
rows no API client), yet a full index takes an entry for every NULL: each write paid for index insertions that no
lookup uses. A lookup by one of them (a purchase's returns, an API client's or a user's rows, the database's own
foreign-key checks on delete) names a value, so the partial index serves it. Measured on the 200,000-purchase import:
PostgreSQL's CPU per transaction 80 -> 71 µs (docs/benchmarks.md).

On PostgreSQL the new indexes are built, and the old ones dropped, CONCURRENTLY, outside a transaction: a plain
CREATE INDEX would stop every write to the ledger while it reads the table."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

# (model, field, Django's name of the field's full index, the partial index's name)
LINKS = [
    ("transaction", "original", "loyalty_transaction_original_id_e8268ced", "transaction_original_set"),
    ("transaction", "api_client", "loyalty_transaction_api_client_id_daf1b0d1", "transaction_api_client_set"),
    ("entry", "staff_user", "loyalty_entry_staff_user_id_84237281", "entry_staff_user_set"),
    ("entry", "api_client", "loyalty_entry_api_client_id_1c50ceaa", "entry_api_client_set"),
]


def _indexes(apps, schema_editor, *, partial: bool):
    """Create each link's partial index (`partial`) or its full one, then drop the other. A build that failed
    before (a cancelled CONCURRENTLY leaves an invalid index behind) is dropped and done again, and the old index
    goes only once its successor is built: a failure stops the migration before that."""
    concurrently = " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
    quote = schema_editor.quote_name
    for model_name, field_name, full, part in LINKS:
        model = apps.get_model("loyalty", model_name)
        table, column = quote(model._meta.db_table), quote(model._meta.get_field(field_name).column)
        where, new, old = (f" WHERE {column} IS NOT NULL", part, full) if partial else ("", full, part)
        schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {quote(new)}")
        schema_editor.execute(f"CREATE INDEX{concurrently} {quote(new)} ON {table} ({column}){where}")
        schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {quote(old)}")


def forwards(apps, schema_editor):
    _indexes(apps, schema_editor, partial=True)


def backwards(apps, schema_editor):
    _indexes(apps, schema_editor, partial=False)


def _link(to, on_delete, **extra):
    return models.ForeignKey(blank=True, db_index=False, null=True, on_delete=on_delete, to=to, **extra)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("core", "0006_program_referral_settings"),
        ("loyalty", "0011_entry_held_after"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    PROTECT, SET_NULL = django.db.models.deletion.PROTECT, django.db.models.deletion.SET_NULL
    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AlterField(
                    model_name="transaction",
                    name="original",
                    field=_link("loyalty.transaction", PROTECT, related_name="returns"),
                ),
                migrations.AlterField(
                    model_name="transaction", name="api_client", field=_link("core.apiclient", SET_NULL)
                ),
                migrations.AlterField(
                    model_name="entry", name="staff_user", field=_link(settings.AUTH_USER_MODEL, PROTECT)
                ),
                migrations.AlterField(model_name="entry", name="api_client", field=_link("core.apiclient", PROTECT)),
            ]
            + [
                migrations.AddIndex(
                    model_name=model_name,
                    index=models.Index(
                        fields=[field_name], condition=models.Q((f"{field_name}__isnull", False)), name=part
                    ),
                )
                for model_name, field_name, _, part in LINKS
            ],
        )
    ]
