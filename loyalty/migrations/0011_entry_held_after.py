"""Entry.held_after: the points open holds set aside right after each entry (0 for entries written before).

On PostgreSQL the column is added with a constant default, which changes only the catalogue, and its CHECK
constraint is added NOT VALID and validated in a second step, outside the migration's transaction: validating
scans the whole ledger, and under the ADD CONSTRAINT's exclusive lock that scan would stop every purchase."""

from django.db import migrations, models

CONSTRAINT = models.CheckConstraint(condition=models.Q(("held_after__gte", 0)), name="entry_held_after_gte_0")


def add_constraint(apps, schema_editor):
    entry = apps.get_model("loyalty", "Entry")
    if schema_editor.connection.vendor != "postgresql":
        schema_editor.add_constraint(entry, CONSTRAINT)
        return
    table = schema_editor.quote_name(entry._meta.db_table)
    schema_editor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {CONSTRAINT.name} CHECK (held_after >= 0) NOT VALID")
    schema_editor.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {CONSTRAINT.name}")


def remove_constraint(apps, schema_editor):
    schema_editor.remove_constraint(apps.get_model("loyalty", "Entry"), CONSTRAINT)


class Migration(migrations.Migration):
    atomic = False  # each step commits on its own: the validation must not run under the exclusive lock

    dependencies = [
        ("loyalty", "0010_drop_redundant_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="entry",
            name="held_after",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddConstraint(model_name="entry", constraint=CONSTRAINT)],
            database_operations=[migrations.RunPython(add_constraint, remove_constraint)],
        ),
    ]
