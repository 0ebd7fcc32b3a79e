from django.db import migrations

# SQLite cannot build tier_counter_unique, a unique index with non-key (INCLUDE) columns, so Django leaves it out
# there (check models.W039). The tier counters' upsert needs a unique index on (member, period): give SQLite a
# plain one. PostgreSQL keeps the covering index alone.
CREATE = "CREATE UNIQUE INDEX IF NOT EXISTS tier_counter_unique_sqlite ON loyalty_tiercounter (member_id, period)"
DROP = "DROP INDEX IF EXISTS tier_counter_unique_sqlite"


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(CREATE)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("loyalty", "0008_paid_with_points")]
    operations = [migrations.RunPython(forward, backward)]
