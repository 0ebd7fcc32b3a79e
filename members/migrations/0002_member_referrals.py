# Referral codes and who referred whom. Existing members get a code of their own.

import secrets

import django.db.models.deletion
from django.db import migrations, models

ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"  # as members.referral_codes, frozen here


def give_codes(apps, schema_editor):
    Member = apps.get_model("members", "Member")
    taken = set()
    batch = []
    for member in Member.objects.filter(referral_code__isnull=True).only("pk", "program_id").iterator():
        while (code := (member.program_id, "".join(secrets.choice(ALPHABET) for _ in range(8)))) in taken:
            pass
        taken.add(code)
        member.referral_code = code[1]
        batch.append(member)
        if len(batch) == 1000:
            Member.objects.bulk_update(batch, ["referral_code"])
            batch = []
    Member.objects.bulk_update(batch, ["referral_code"])


class Migration(migrations.Migration):
    dependencies = [
        ("members", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="member",
            name="referral_code",
            field=models.CharField(editable=False, max_length=8, null=True),
        ),
        migrations.RunPython(give_codes, migrations.RunPython.noop, elidable=True),
        migrations.AlterField(
            model_name="member",
            name="referral_code",
            field=models.CharField(editable=False, max_length=8),
        ),
        migrations.AddField(
            model_name="member",
            name="referred_by",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="referees",
                to="members.member",
            ),
        ),
        migrations.AddConstraint(
            model_name="member",
            constraint=models.UniqueConstraint(fields=("program", "referral_code"), name="member_referral_code_unique"),
        ),
    ]
