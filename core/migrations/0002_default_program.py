from django.conf import settings
from django.db import migrations


def create_default_program(apps, schema_editor):
    Program = apps.get_model("core", "Program")
    # API.md: 1 point per whole 1.00, rounded down per transaction, no pending period, 24-month expiry, no tiers.
    Program.objects.get_or_create(
        code="DEFAULT",
        defaults={
            "name": "Default programme",
            "currency": settings.LOYALTY_DEFAULT_CURRENCY,
            "points_per_unit": 1,
            "rounding": "down",
            "pending_days": 0,
            "expiry_months": 24,
            "return_policy": "allow_negative",
        },
    )


class Migration(migrations.Migration):
    dependencies = [("core", "0001_initial")]
    operations = [migrations.RunPython(create_default_program, migrations.RunPython.noop)]
