import factory

from core.models import Program
from members.models import Member
from members.services import member_enroll, member_update


class ProgramFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Program

    code = factory.Sequence(lambda n: f"P{n}")
    name = factory.LazyAttribute(lambda o: f"Programme {o.code}")
    currency = "SEK"


class MemberFactory(factory.django.DjangoModelFactory):
    """Enrols through members.services.member_enroll, so test members are normalised like real ones."""

    class Meta:
        model = Member

    # get_or_create: a transactional test empties every table, the migration's DEFAULT programme included.
    program = factory.LazyFunction(
        lambda: Program.objects.get_or_create(
            code="DEFAULT", defaults={"name": "Default programme", "currency": "SEK"}
        )[0]
    )
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    email = factory.Sequence(lambda n: f"member{n}@example.com")

    @classmethod
    def _create(cls, model_class, *args, enrolled_at=None, status=None, source="factory", **kwargs):
        member = member_enroll(now=enrolled_at, source=source, **kwargs)
        if status is not None:
            member = member_update(member=member, status=status, source=source)
        return member


def record(program, member, total, *, external_id, kind="purchase", original=None, at, now=None, store="S1"):
    """A till's purchase (or return of `original`) through the service, as most tests send one."""
    from decimal import Decimal

    from loyalty.transactions import TransactionInput, transaction_record

    data = TransactionInput(
        store=store,
        external_id=external_id,
        channel="pos",
        kind=kind,
        occurred_at=at,
        currency="SEK",
        total=Decimal(total),
        member=member,
        original_external_id=original,
    )
    return transaction_record(program=program, data=data, now=now or at)
