"""The ledger jobs run by a real Celery worker, against Redis and the test database; and their retry policy."""

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult
from django.conf import settings
from django.db import OperationalError, connection
from django.utils import timezone

from config.celery import app as celery_app
from core.models import IdempotencyRecord
from core.tasks import idempotency_records_purge, purge_idempotency_records
from loyalty import tasks
from loyalty.ledger import ledger_credit
from loyalty.models import Account, Entry, Lot
from loyalty.transactions import TransactionInput, transaction_record
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory

BASE_DIR = settings.BASE_DIR
WORKER_START_TIMEOUT = 60
TASK_TIMEOUT = 60


def _database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """A `celery worker` process on the suite's Redis and the test database (so it sees committed rows only)."""
    with django_db_blocker.unblock():
        database_url = _database_url()
    # Whatever an aborted earlier run left in the queue must not run against this run's database.
    celery_app.control.purge()
    name = f"test-{uuid.uuid4().hex[:8]}@localhost"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in the finaliser below
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "CELERY_TASK_ALWAYS_EAGER": "false",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "--result-backend", settings.REDIS_URL]
        + ["--skip-checks", "worker"]
        + ["--pool", "solo", "--loglevel", "INFO", "--hostname", name]
        + ["--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not celery_app.control.ping(destination=[name], timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"The Celery worker did not start:\n{log_path.read_text()}")
        yield RedisBackend(app=celery_app, url=settings.REDIS_URL)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _run(worker_backend, task) -> int:
    """Send the task through the broker and wait for the worker's result."""
    sent = task.delay()
    return AsyncResult(sent.id, app=celery_app, backend=worker_backend).get(timeout=TASK_TIMEOUT)


def _purchase(program, member, *, external_id: str, total: str, occurred_at):
    """A purchase recorded when it happened, as a till that was online would have sent it."""
    return transaction_record(
        program=program,
        now=occurred_at,
        data=TransactionInput(
            store="S1",
            external_id=external_id,
            channel="pos",
            kind="purchase",
            occurred_at=occurred_at,
            currency=program.currency,
            total=Decimal(total),
            member=member,
        ),
    )


def _snapshot():
    return (
        list(Account.objects.order_by("pk").values_list("pk", "available", "pending", "lifetime_earned")),
        list(Lot.objects.order_by("pk").values_list("pk", "remaining", "matured")),
        Entry.objects.count(),
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_matures_pending_points_once(worker, program):
    # given a purchase whose 14 pending days are over, and one still pending
    program.pending_days = 14
    program.save()
    member = MemberFactory(program=program)
    now = timezone.now()
    due = _purchase(program, member, external_id="old", total="150.00", occurred_at=now - timedelta(days=15))
    _purchase(program, member, external_id="new", total="40.00", occurred_at=now - timedelta(days=1))
    assert Account.objects.get(pk=member.pk).pending == 190
    # when the worker runs the job
    matured = _run(worker, tasks.mature_pending_points)
    # then the due lot is spendable and the other still pending
    assert matured == 1
    account = Account.objects.get(pk=member.pk)
    assert (account.available, account.pending) == (150, 40)
    assert Lot.objects.get(entry__transaction=due.transaction).matured
    # and a second run changes nothing
    before = _snapshot()
    assert _run(worker, tasks.mature_pending_points) == 0
    assert _snapshot() == before
    assert ledger_verify() == []


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_expires_points_once(worker, program):
    # given an adjustment lot that expired yesterday, partly spent, and a live purchase
    member = MemberFactory(program=program)
    now = timezone.now()
    ledger_credit(
        member_id=member.pk,
        kind=Entry.Kind.ADJUST,
        points=80,
        occurred_at=now - timedelta(days=400),
        available_from=now - timedelta(days=400),
        expires_at=now - timedelta(days=1),
        now=now - timedelta(days=400),
        reason="goodwill",
    )
    _purchase(program, member, external_id="live", total="25.00", occurred_at=now - timedelta(days=3))
    # when the worker runs the job
    expired = _run(worker, tasks.expire_points)
    # then the old lot is emptied by exactly one expire entry, and the live one is untouched
    assert expired == 1
    expire_entries = list(Entry.objects.filter(account_id=member.pk, kind=Entry.Kind.EXPIRE))
    assert [e.points for e in expire_entries] == [-80]
    account = Account.objects.get(pk=member.pk)
    assert (account.available, account.pending) == (25, 0)
    assert sorted(Lot.objects.filter(account_id=member.pk).values_list("remaining", flat=True)) == [0, 25]
    # and a second run changes nothing
    before = _snapshot()
    assert _run(worker, tasks.expire_points) == 0
    assert _snapshot() == before
    assert Entry.objects.filter(kind=Entry.Kind.EXPIRE).count() == 1
    assert ledger_verify() == []


@pytest.fixture
def eager_retries(settings):
    """Run a task and its retries in-process, and keep a failure in the result rather than raising at once."""
    settings.CELERY_TASK_EAGER_PROPAGATES = False


def test_a_transient_database_error_is_retried(monkeypatch, eager_retries):
    # given a ledger that loses its connection once
    calls = []

    def flaky(*, now, batch_size):
        calls.append(batch_size)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return 3

    monkeypatch.setattr(tasks, "ledger_mature_due", flaky)
    # when the job runs
    result = tasks.mature_pending_points.apply()
    # then it retried and succeeded, with the configured batch size
    assert result.get() == 3
    assert calls == [settings.LEDGER_BATCH_SIZE] * 2


def test_a_persistent_database_error_gives_up_after_the_cap(monkeypatch, eager_retries):
    # given a database that never comes back
    calls = []

    def down(*, now, batch_size):
        calls.append(1)
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(tasks, "ledger_expire_due", down)
    # when the job runs, then it fails after the initial try and max_retries retries
    with pytest.raises(OperationalError):
        tasks.expire_points.apply().get()
    assert len(calls) == 1 + tasks.expire_points.max_retries


def test_any_other_error_is_not_retried(monkeypatch, eager_retries):
    # given a bug rather than an outage
    calls = []

    def broken(*, now, batch_size):
        calls.append(1)
        raise ValueError("bug")

    monkeypatch.setattr(tasks, "ledger_expire_due", broken)
    # when the job runs, then it fails at once
    with pytest.raises(ValueError):
        tasks.expire_points.apply().get()
    assert calls == [1]


def test_idempotency_records_older_than_a_week_are_purged(make_client):
    # given records of 8 days, 6 days and a minute ago
    client, _ = make_client()
    now = timezone.now()
    for key, age in (("old", timedelta(days=8)), ("recent", timedelta(days=6)), ("fresh", timedelta(minutes=1))):
        IdempotencyRecord.objects.create(client=client, key=key, request_hash="h", created_at=now - age)
    # when the daily purge runs
    deleted = idempotency_records_purge(now=now)
    # then only the week-old record is gone
    assert deleted == 1
    assert sorted(IdempotencyRecord.objects.values_list("key", flat=True)) == ["fresh", "recent"]
    # and a second run deletes nothing
    assert idempotency_records_purge(now=now) == 0


def test_the_purge_task_is_scheduled_daily_and_deletes(make_client):
    # given a stale record
    client, _ = make_client()
    IdempotencyRecord.objects.create(
        client=client, key="k", request_hash="h", created_at=timezone.now() - timedelta(days=30)
    )
    # when the scheduled task runs
    scheduled = [s["task"] for s in settings.CELERY_BEAT_SCHEDULE.values()]
    result = purge_idempotency_records.apply()
    # then it is on the beat schedule and removed the record
    assert "core.tasks.purge_idempotency_records" in scheduled
    assert result.get() == 1
    assert not IdempotencyRecord.objects.exists()
