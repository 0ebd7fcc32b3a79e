# Holds (Account.held) and refunds of cancelled redemptions (Entry.kind "refund", Entry.refund_of).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("loyalty", "0002_append_only"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="entry",
            name="entry_sign_matches_kind",
        ),
        migrations.AddField(
            model_name="account",
            name="held",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name="entry",
            name="refund_of",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="refunded_by",
                to="loyalty.entry",
            ),
        ),
        migrations.AlterField(
            model_name="entry",
            name="kind",
            field=models.CharField(
                choices=[
                    ("earn", "Earned"),
                    ("reversal", "Reversed by a return"),
                    ("redeem", "Redeemed"),
                    ("expire", "Expired"),
                    ("adjust", "Adjusted"),
                    ("refund", "Refunded (a cancelled redemption)"),
                ],
                max_length=10,
            ),
        ),
        migrations.AddConstraint(
            model_name="account",
            constraint=models.CheckConstraint(condition=models.Q(("held__gte", 0)), name="account_held_gte_0"),
        ),
        migrations.AddConstraint(
            model_name="entry",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("kind", "earn"), ("points__gt", 0)),
                    models.Q(("kind__in", ["reversal", "redeem", "expire"]), ("points__lt", 0)),
                    models.Q(("kind", "adjust"), ("points__lt", 0)),
                    models.Q(("kind", "adjust"), ("points__gt", 0)),
                    models.Q(("kind", "refund"), ("points__gt", 0)),
                    _connector="OR",
                ),
                name="entry_sign_matches_kind",
            ),
        ),
        migrations.AddConstraint(
            model_name="entry",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("kind", "refund"), ("refund_of__isnull", False)),
                    models.Q(models.Q(("kind", "refund"), _negated=True), ("refund_of__isnull", True)),
                    _connector="OR",
                ),
                name="refund_names_its_spend",
            ),
        ),
    ]
