"""loyalty_statement_abort(reason): raises, with SQLSTATE LY001, so that a single statement can undo everything it
wrote when a condition it checks fails. A purchase's one statement uses it when a limit claim falls short
(loyalty.ledger.ledger_credit_new_transaction): a failed statement writes nothing on its own, so the purchase needs
no database transaction around it, which took two more round trips (BEGIN, COMMIT). PostgreSQL only."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION loyalty_statement_abort(reason text) RETURNS boolean AS $$
BEGIN
    RAISE EXCEPTION '%%', reason USING ERRCODE = 'LY001';
END $$ LANGUAGE plpgsql VOLATILE;
"""
DROP = "DROP FUNCTION IF EXISTS loyalty_statement_abort(text);"


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("loyalty", "0012_partial_link_indexes")]
    operations = [migrations.RunPython(forward, backward)]
