import factory
from django.utils import timezone

from core.models import Program
from members.models import Member
from members.numbers import new_member_number


class ProgramFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Program

    code = factory.Sequence(lambda n: f"P{n}")
    name = factory.LazyAttribute(lambda o: f"Programme {o.code}")
    currency = "SEK"


class MemberFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Member

    program = factory.LazyFunction(lambda: Program.objects.get(code="DEFAULT"))
    member_number = factory.LazyFunction(new_member_number)
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    email = factory.Sequence(lambda n: f"member{n}@example.com")
    enrolled_at = factory.LazyFunction(timezone.now)
