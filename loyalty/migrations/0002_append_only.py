from django.db import migrations

# On PostgreSQL the database itself refuses to change or delete ledger entries and draws.
FORBID = """
CREATE OR REPLACE FUNCTION loyalty_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: %% on %% is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$ LANGUAGE plpgsql;
CREATE TRIGGER loyalty_entry_append_only BEFORE UPDATE OR DELETE ON loyalty_entry
    FOR EACH ROW EXECUTE FUNCTION loyalty_append_only();
CREATE TRIGGER loyalty_draw_append_only BEFORE UPDATE OR DELETE ON loyalty_draw
    FOR EACH ROW EXECUTE FUNCTION loyalty_append_only();
"""
ALLOW = """
DROP TRIGGER IF EXISTS loyalty_entry_append_only ON loyalty_entry;
DROP TRIGGER IF EXISTS loyalty_draw_append_only ON loyalty_draw;
DROP FUNCTION IF EXISTS loyalty_append_only();
"""


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORBID)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(ALLOW)


class Migration(migrations.Migration):
    dependencies = [("loyalty", "0001_initial")]
    operations = [migrations.RunPython(forward, backward)]
