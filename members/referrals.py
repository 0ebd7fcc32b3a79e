"""Referral codes and who referred whom. Codes are short, random, and made of characters that cannot be mistaken for
each other when read aloud or typed from a screen (no 0/O, 1/I/L). A member names their referrer at enrolment, or
once within REFERRAL_ATTACH_DAYS after it; loyalty.referrals rewards both members."""

from datetime import datetime, timedelta

from django.db import connection

from core.errors import Conflict, Unprocessable
from core.models import Program
from members.models import Member
from members.referral_codes import ALPHABET, new_referral_code, normalize_referral_code

__all__ = ["ALPHABET", "attach_referrer", "new_referral_code", "referrer_for_code"]

# A member who enrolled without a code may still name their referrer for this long, but only once.
REFERRAL_ATTACH_DAYS = 14
REFERRAL_CHAIN_MAX = 1000
_REFERRAL_LOCK = 0x52454646  # advisory lock class for referral attachments ("REFF")


def referrer_for_code(*, program: Program, value) -> tuple[Member | None, str | None]:
    """The active member of the programme whose referral code this is, or a message saying why there is none."""
    code = normalize_referral_code(value) if isinstance(value, str) else ""
    if not code:
        return None, "Must be a referral code such as 'K7MQ2XPA'."
    referrer = Member.objects.filter(program=program, referral_code=code).first()
    if referrer is None:
        return None, f"No member of this programme has the referral code '{code}'."
    if referrer.status != Member.Status.ACTIVE:
        return None, f"The referral code '{code}' belongs to a member who is {referrer.status}."
    return referrer, None


def attach_referrer(*, member: Member, referrer: Member, now: datetime) -> None:
    """Name the member's referrer after enrolment. Refuses a second referrer, the member's own code, a loop (the
    referrer was referred, directly or down a chain, by this member) and a late attachment, changing nothing.
    The caller holds the member's row lock."""
    field = "referral_code"
    if member.referred_by_id is not None:
        raise Conflict(
            "This member was already referred; a member is referred once.",
            code="already_referred",
            errors={field: ["The member already has a referrer."]},
        )
    if referrer.pk == member.pk:
        raise Unprocessable(
            "A member cannot refer themselves.",
            code="self_referral",
            errors={field: ["This is the member's own code."]},
        )
    if now - member.enrolled_at > timedelta(days=REFERRAL_ATTACH_DAYS):
        raise Unprocessable(
            f"A referral code can be added at most {REFERRAL_ATTACH_DAYS} days after enrolment.",
            code="referral_too_late",
            errors={field: [f"Only within {REFERRAL_ATTACH_DAYS} days of enrolment."]},
        )
    # Attachments in a programme are rare, so one lock per programme serialises them: two members naming each other
    # at the same moment would otherwise both see no loop.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # SQLite needs no lock: its IMMEDIATE transactions serialise writers
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_REFERRAL_LOCK, member.program_id])
        cursor.execute(
            f"""WITH RECURSIVE chain(id, depth) AS (
                    SELECT referred_by_id, 1 FROM {Member._meta.db_table} WHERE id = %s
                    UNION ALL
                    SELECT m.referred_by_id, c.depth + 1 FROM {Member._meta.db_table} m JOIN chain c ON m.id = c.id
                    WHERE c.id IS NOT NULL AND c.depth < %s)
                SELECT EXISTS (SELECT 1 FROM chain WHERE id = %s)""",
            [referrer.pk, REFERRAL_CHAIN_MAX, member.pk],
        )
        loop = cursor.fetchone()[0]
    if loop:
        raise Unprocessable(
            f"Member {referrer.member_number} was referred by this member; referrals cannot go round in a loop.",
            code="referral_loop",
            errors={field: ["The code's owner was referred by this member."]},
        )
    member.referred_by = referrer
    member.save(update_fields=["referred_by", "updated_at"])
