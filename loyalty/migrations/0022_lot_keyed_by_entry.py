"""A lot keyed by its credit's entry instead of an id of its own: each credit wrote a second unique index entry for
the lot (its id beside its entry) and drew the id from a sequence (docs/benchmarks.md, fifteenth round).

Draws name their lots by the new key: their lot_id becomes the lot's entry id. Their foreign key is taken off while
the values change and put back on the new key (PostgreSQL), or their table is built again on it (SQLite, the
embedded default, where a foreign key names its column in the table's definition). Lots are spent soonest-to-expire
first and then in the order they were credited, which the entries' ids keep as the lots' own ids did.

One transaction: it holds lots and draws locked against every write while it rewrites the draws, builds the lots'
new primary key and checks the draws' foreign key against it, which takes time in proportion to the ledger; on a
large ledger, run it when the tills can wait (a failure leaves everything as it was).

Backwards, each lot gets its entry's id as its own id again (so the order of spending stays), and the draws, which
name lots by those, refer to the id."""

import django.db.models.deletion
from django.db import migrations, models

_FK = "loyalty_draw_lot_id_fk_loyalty_lot"


def _draw_lot_key(schema_editor) -> str | None:
    """The name of the draws' foreign key to lots (PostgreSQL)."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'loyalty_draw'::regclass AND contype = 'f' "
            "AND confrelid = 'loyalty_lot'::regclass"
        )
        row = cursor.fetchone()
    return row[0] if row else None


def _draws_rekeyed(schema_editor, sql: str) -> None:
    """Run `sql`, an UPDATE of the draws' lot_id (PostgreSQL). Draws are append-only (loyalty_draw_append_only):
    this renames the lot each names, it changes nothing they record, so the trigger is off for this statement and
    then as it was before (enabled, always, for replicas only, or disabled)."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'loyalty_draw'::regclass "
            "AND tgname = 'loyalty_draw_append_only'"
        )
        state = cursor.fetchone()[0]
    schema_editor.execute("ALTER TABLE loyalty_draw DISABLE TRIGGER loyalty_draw_append_only")
    schema_editor.execute(sql)
    if state != "D":
        how = {"A": "ALWAYS ", "R": "REPLICA "}.get(state, "")
        schema_editor.execute(f"ALTER TABLE loyalty_draw ENABLE {how}TRIGGER loyalty_draw_append_only")


def _draws_by_entry(apps, schema_editor):
    """Before the lots lose their ids: the draws name each lot by its entry."""
    if schema_editor.connection.vendor == "postgresql":
        if name := _draw_lot_key(schema_editor):
            schema_editor.execute(f"ALTER TABLE loyalty_draw DROP CONSTRAINT {name}")
        _draws_rekeyed(
            schema_editor,
            "UPDATE loyalty_draw d SET lot_id = l.entry_id FROM loyalty_lot l "
            "WHERE l.id = d.lot_id AND l.id <> l.entry_id",
        )
    else:
        schema_editor.execute(
            "UPDATE loyalty_draw SET lot_id = (SELECT l.entry_id FROM loyalty_lot l WHERE l.id = loyalty_draw.lot_id)"
        )


def _draws_by_id(apps, schema_editor):
    """Backwards, once the lots have an id column again: each lot's id is its entry's (through negative values, as
    the key is checked row by row), the id sequence goes on after the last, and the draws refer to the id."""
    for sql in ("UPDATE loyalty_lot SET id = -entry_id", "UPDATE loyalty_lot SET id = -id"):
        schema_editor.execute(sql)
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "SELECT setval(pg_get_serial_sequence('loyalty_lot', 'id'), max(id)) FROM loyalty_lot HAVING count(*) > 0"
        )
        schema_editor.execute(
            f"ALTER TABLE loyalty_draw ADD CONSTRAINT {_FK}_id FOREIGN KEY (lot_id) REFERENCES loyalty_lot (id) "
            "DEFERRABLE INITIALLY DEFERRED"
        )
    else:
        schema_editor.execute(
            "UPDATE sqlite_sequence SET seq = (SELECT max(id) FROM loyalty_lot) "
            "WHERE name = 'loyalty_lot' AND EXISTS (SELECT 1 FROM loyalty_lot)"
        )
        schema_editor._remake_table(apps.get_model("loyalty", "Draw"))


def _draws_refer_to_entries(apps, schema_editor):
    """After: the draws' foreign key on the lots' new key."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"ALTER TABLE loyalty_draw ADD CONSTRAINT {_FK}_entry_id FOREIGN KEY (lot_id) "
            "REFERENCES loyalty_lot (entry_id) DEFERRABLE INITIALLY DEFERRED"
        )
    else:
        schema_editor._remake_table(apps.get_model("loyalty", "Draw"))


def _draws_refer_to_nothing(apps, schema_editor):
    """Backwards, before the lots get their ids again: the draws' foreign key off (PostgreSQL; SQLite builds the
    draws' table again afterwards, _draws_by_id)."""
    if schema_editor.connection.vendor == "postgresql" and (name := _draw_lot_key(schema_editor)):
        schema_editor.execute(f"ALTER TABLE loyalty_draw DROP CONSTRAINT {name}")


class Migration(migrations.Migration):
    dependencies = [
        ("loyalty", "0021_lot_account_unindexed"),
    ]

    operations = [
        migrations.RunPython(_draws_by_entry, _draws_by_id),
        migrations.RemoveField(
            model_name="lot",
            name="id",
        ),
        migrations.AlterField(
            model_name="lot",
            name="entry",
            field=models.OneToOneField(
                on_delete=django.db.models.deletion.PROTECT,
                primary_key=True,
                related_name="lot",
                serialize=False,
                to="loyalty.entry",
            ),
        ),
        migrations.RunPython(_draws_refer_to_entries, _draws_refer_to_nothing),
    ]
