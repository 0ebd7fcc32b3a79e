"""seed_demo: demo data that a second run does not duplicate."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from core.models import ApiClient
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.verify import ledger_verify
from members.models import Member


def _seed(*args) -> str:
    out = io.StringIO()
    call_command("seed_demo", *args, stdout=out)
    return out.getvalue()


def _counts():
    return (
        Member.objects.count(),
        Transaction.objects.count(),
        Entry.objects.count(),
        Lot.objects.count(),
        list(Account.objects.order_by("pk").values_list("available", "pending")),
        get_user_model().objects.count(),
        ApiClient.objects.count(),
    )


@pytest.mark.django_db
def test_seed_demo_loads_members_with_live_and_expired_points_and_prints_credentials(program):
    # when
    out = _seed("--customers", "25")
    # then 25 members with their CDNOW purchases, some points expired, the ledger consistent
    assert Member.objects.filter(program=program).count() == 25
    assert set(Member.objects.values_list("locale", flat=True)) == {"en", "sv", "nb"}
    assert Transaction.objects.filter(program=program, external_id__startswith="cdnow-").count() > 25
    assert Entry.objects.filter(kind=Entry.Kind.EXPIRE).exists()
    assert Account.objects.filter(available__gt=0).exists()
    assert ledger_verify() == []
    # and a working staff login and all-scopes key were printed
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff
    assert "password '" in out
    client = ApiClient.objects.get(name="demo-pos")
    assert sorted(client.scopes) == sorted(ApiClient.Scope.values)
    raw_key = out.split("API key: ")[1].split()[0]
    assert ApiClient.hash_key(raw_key) == client.key_hash


@pytest.mark.django_db
def test_a_second_seed_adds_nothing_and_rotates_the_key(program):
    # given
    first = _seed("--customers", "10")
    before = _counts()
    first_key = first.split("API key: ")[1].split()[0]
    # when
    second = _seed("--customers", "10")
    # then nothing was added, the password is not reprinted, and a new, working key is printed
    assert _counts() == before
    assert "exists already" in second and "password '" not in second
    second_key = second.split("API key: ")[1].split()[0]
    assert second_key != first_key
    assert ApiClient.objects.get(name="demo-pos").key_hash == ApiClient.hash_key(second_key)


@pytest.mark.django_db
def test_seed_demo_refuses_a_bad_customer_count_and_writes_nothing(program):
    # when, then
    with pytest.raises(CommandError, match="--customers"):
        _seed("--customers", "0")
    assert not Member.objects.exists()
    assert not ApiClient.objects.exists()
    assert not get_user_model().objects.exists()
