"""Member services on their own: consent history, member numbers, refusals and races decided by the database."""

import threading

import pytest
from django.db import connection

from core.errors import InvalidInput, MemberExists
from members.models import ConsentEvent, Identifier, Member
from members.services import consents_set, member_enroll, member_update


def enrol(program, **fields):
    return member_enroll(program=program, source="test", **fields)


def snapshot():
    return (Member.objects.count(), Identifier.objects.count(), ConsentEvent.objects.count())


def test_consents_set_records_only_changes(program):
    # given
    member = enrol(program, consents={"email": True, "sms": False})
    # when
    events = consents_set(member=member, consents={"email": True, "sms": False, "push": True}, source="portal")
    # then
    assert [(e.channel, e.granted) for e in events] == [("push", True)]
    assert ConsentEvent.objects.filter(member=member).count() == 2
    member.refresh_from_db()
    assert (member.consent_email, member.consent_sms, member.consent_push) == (True, False, True)


def test_consents_set_refuses_an_unknown_channel_and_changes_nothing(program):
    # given
    member = enrol(program)
    # when
    with pytest.raises(InvalidInput):
        consents_set(member=member, consents={"email": True, "fax": True}, source="portal")
    # then
    assert not ConsentEvent.objects.exists()
    member.refresh_from_db()
    assert member.consent_email is False


def test_a_member_number_collision_is_retried(program, monkeypatch):
    # given a member holding the number the generator will offer first
    first = enrol(program)
    numbers = iter([first.member_number, "1000000009"])
    monkeypatch.setattr("members.services.new_member_number", lambda: next(numbers))
    # when
    second = enrol(program)
    # then
    assert second.member_number == "1000000009"
    assert Member.objects.count() == 2


def test_member_update_refuses_an_unknown_field_and_changes_nothing(program):
    # given
    member = enrol(program, first_name="Anna")
    # when
    with pytest.raises(InvalidInput) as raised:
        member_update(member=member, source="test", first_name="Bo", program=None)
    # then
    assert "program" in raised.value.errors
    member.refresh_from_db()
    assert member.first_name == "Anna"


def test_member_enroll_of_a_duplicate_raises_member_exists_and_writes_nothing(program):
    # given
    enrol(program, email="anna@example.com")
    before = snapshot()
    # when
    with pytest.raises(MemberExists):
        enrol(program, email="anna@example.com", cards=["C9"], consents={"sms": True})
    # then
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_enrolments_of_one_email_let_exactly_one_win(program):
    # given two tills that enrol the same person at the same moment
    barrier = threading.Barrier(2)
    outcomes = []

    def run():
        try:
            barrier.wait(timeout=10)
            enrol(program, email="race@example.com", cards=[f"CARD-{threading.get_ident()}"])
            outcomes.append("created")
        except MemberExists:
            outcomes.append("exists")
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # then
    assert sorted(outcomes) == ["created", "exists"]
    assert Member.objects.filter(email="race@example.com").count() == 1
    assert Identifier.objects.count() == 1
