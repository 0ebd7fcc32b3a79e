from django.core.exceptions import ValidationError

from core.db import fetch_instance
from core.errors import InvalidInput, MemberNotFound
from core.models import Program
from members.models import Identifier, Member
from members.normalize import normalize_channel, normalize_email, normalize_phone
from members.numbers import is_valid_member_number


def member_get(*, program: Program, member_number: str) -> Member:
    """The programme's member with this number, or NotFound."""
    if not is_valid_member_number(member_number):
        # No member has it; and some text PostgreSQL would refuse, not answer (a NUL from a path's %00).
        raise member_not_found(member_number)
    # The number is unique, so the programme condition only keeps other programmes' members out.
    member = fetch_instance(Member, "member_number = %s AND program_id = %s", [member_number, program.pk])
    if member is None:
        raise member_not_found(member_number)
    return member


def member_not_found(member_number: str) -> MemberNotFound:
    return MemberNotFound(f"No member {member_number} in this programme.")


def member_lookup(
    *,
    program: Program,
    email: str | None = None,
    phone: str | None = None,
    card: str | None = None,
    external_id: str | None = None,
    channel: str | None = None,
) -> Member:
    """The member one identifier points to, or NotFound. Exactly one identifier must be given."""
    given = {k: v for k, v in {"email": email, "phone": phone, "card": card, "external_id": external_id}.items() if v}
    if len(given) != 1:
        raise InvalidInput("Give exactly one of email, phone, card, or external_id with channel.")
    if external_id and not channel:
        raise InvalidInput("An external_id lookup needs its channel.", errors={"channel": ["This field is required."]})
    members = Member.objects.filter(program=program)
    try:
        if email:
            member = members.filter(email=normalize_email(email)).first()
        elif phone:
            member = members.filter(phone=normalize_phone(phone)).first()
        elif card:
            member = members.filter(identifiers__kind=Identifier.Kind.CARD, identifiers__value=card.strip()).first()
        else:
            member = members.filter(
                identifiers__kind=Identifier.Kind.EXTERNAL,
                identifiers__channel=normalize_channel(channel),
                identifiers__value=external_id.strip(),
            ).first()
    except ValidationError as exc:
        raise InvalidInput(" ".join(exc.messages), errors={next(iter(given)): exc.messages}) from exc
    if member is None:
        raise MemberNotFound("No member has this identifier.")
    return member
