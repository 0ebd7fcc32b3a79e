"""Drop three single-column foreign-key indexes that a wider index already serves: each costs every imported row an
index insertion and no query needs it. Transaction.program leads the unique (program, store, external_id),
Transaction.member the (member, -occurred_at) index, Entry.account the (account, -occurred_at, -id) index.

Only the indexes go: AlterField alone would also drop and re-add (and so re-validate) each foreign key."""

import django.db.models.deletion
from django.db import migrations, models

INDEXES = [
    ("loyalty_transaction_program_id_dcab19ed", "loyalty_transaction", "program_id"),
    ("loyalty_transaction_member_id_a70d4888", "loyalty_transaction", "member_id"),
    ("loyalty_entry_account_id_7567808d", "loyalty_entry", "account_id"),
]


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0006_program_referral_settings"),
        ("loyalty", "0009_tier_counter_sqlite_unique"),
        ("members", "0002_member_referrals"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{name}"',
                    reverse_sql=f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}")',
                )
                for name, table, column in INDEXES
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="entry",
                    name="account",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="entries",
                        to="loyalty.account",
                    ),
                ),
                migrations.AlterField(
                    model_name="transaction",
                    name="member",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="transactions",
                        to="members.member",
                    ),
                ),
                migrations.AlterField(
                    model_name="transaction",
                    name="program",
                    field=models.ForeignKey(
                        db_index=False, on_delete=django.db.models.deletion.PROTECT, to="core.program"
                    ),
                ),
            ],
        )
    ]
