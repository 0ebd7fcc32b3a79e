"""Staff work on members in the admin through the same services as the API."""

import pytest
from django.contrib.auth import get_user_model

from members.models import ConsentEvent, Member
from members.services import member_enroll

ADMIN = "/admin/members/member/"


@pytest.fixture
def staff(db, client):
    user = get_user_model().objects.create_superuser("staff", "staff@example.com", None)
    client.force_login(user)
    return client


def enrol(program, **fields):
    return member_enroll(program=program, source="test", **fields)


def form_data(member: Member, **overrides) -> dict:
    data = {
        "first_name": member.first_name,
        "last_name": member.last_name,
        "email": member.email or "",
        "phone": member.phone or "",
        "birth_date": "",
        "locale": member.locale,
        "timezone": member.timezone,
        "status": member.status,
        **{f: "on" for f in ("consent_email", "consent_sms", "consent_push") if getattr(member, f)},
    }
    for inline in ("identifiers", "consent_events"):
        data |= {f"{inline}-TOTAL_FORMS": "0", f"{inline}-INITIAL_FORMS": "0"}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "term", ["0701234567", "070-123 45 67", "CARD-77", "c-991", "ANNAS@example.com", "annas", "MEMBER_NUMBER"]
)
def test_staff_find_a_member_by_number_email_phone_card_or_external_id(staff, program, term):
    # given
    member = enrol(
        program,
        email="annas@example.com",
        phone="+46701234567",
        cards=["CARD-77"],
        external_ids={"web": "c-991"},
    )
    enrol(program, email="someone@example.com", phone="+46701111111", cards=["CARD-1"])
    term = member.member_number if term == "MEMBER_NUMBER" else term
    # when
    response = staff.get(ADMIN, {"q": term})
    # then
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [member]


def test_the_change_page_shows_identifiers_and_consent_history(staff, program):
    # given
    member = enrol(program, cards=["CARD-77"], external_ids={"web": "c-991"}, consents={"sms": True})
    # when
    page = staff.get(f"{ADMIN}{member.pk}/change/").content.decode()
    # then
    assert "CARD-77" in page and "c-991" in page
    assert "Consent history" in page and "test" in page


def test_a_staff_change_goes_through_the_service(staff, program):
    # given
    member = enrol(program, email="anna@example.com", first_name="Anna")
    # when
    response = staff.post(
        f"{ADMIN}{member.pk}/change/", form_data(member, phone="070-123 45 67", consent_email="on", first_name="Ann")
    )
    # then
    assert response.status_code == 302
    member.refresh_from_db()
    assert (member.first_name, member.phone, member.consent_email) == ("Ann", "+46701234567", True)
    event = ConsentEvent.objects.get(member=member)
    assert (event.channel, event.granted, event.source) == ("email", True, "admin:staff")


def test_a_staff_change_to_a_taken_email_is_a_form_error_and_changes_nothing(staff, program):
    # given
    enrol(program, email="taken@example.com")
    member = enrol(program, email="anna@example.com", first_name="Anna")
    # when
    response = staff.post(
        f"{ADMIN}{member.pk}/change/", form_data(member, email="Taken@Example.com", first_name="Changed")
    )
    # then
    assert response.status_code == 200
    assert "email" in response.context["adminform"].form.errors
    member.refresh_from_db()
    assert (member.email, member.first_name) == ("anna@example.com", "Anna")


def test_a_staff_change_with_a_bad_phone_is_a_form_error(staff, program):
    # given
    member = enrol(program, email="anna@example.com")
    # when
    response = staff.post(f"{ADMIN}{member.pk}/change/", form_data(member, phone="12", timezone="Nowhere"))
    # then
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "phone" in errors and "timezone" in errors
    member.refresh_from_db()
    assert member.phone is None


def test_staff_enrol_a_member_through_the_service(staff, program):
    # given
    data = form_data(Member(program=program), email=" New@Example.com ", consent_sms="on", program=program.pk)
    # when
    response = staff.post(f"{ADMIN}add/", data)
    # then
    assert response.status_code == 302, response.context["adminform"].form.errors
    member = Member.objects.get()
    assert (member.email, member.enrollment_channel, member.consent_sms) == ("new@example.com", "admin", True)
    assert len(member.member_number) == 10
    assert ConsentEvent.objects.filter(member=member, channel="sms", granted=True).exists()
