"""Housekeeping jobs for core tables."""

import logging
from datetime import datetime, timedelta

from celery import shared_task
from django.db import OperationalError
from django.utils import timezone

from core.models import IdempotencyRecord

logger = logging.getLogger(__name__)

# Clients retry within minutes; a week covers a till that was offline over a long weekend and then replays its queue.
IDEMPOTENCY_RETENTION = timedelta(days=7)
PURGE_BATCH = 5000


def idempotency_records_purge(*, now: datetime, retention: timedelta = IDEMPOTENCY_RETENTION) -> int:
    """Delete idempotency records created before `now - retention`. Returns how many were deleted.
    Deletes in bounded batches, each its own short transaction, so the API's inserts are never held up for long."""
    cutoff = now - retention
    deleted = 0
    while True:
        ids = list(IdempotencyRecord.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[:PURGE_BATCH])
        if not ids:
            return deleted
        deleted += IdempotencyRecord.objects.filter(pk__in=ids).delete()[0]


@shared_task(
    name="core.tasks.purge_idempotency_records",
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
    acks_late=True,
)
def purge_idempotency_records() -> int:
    """Daily: forget idempotency keys older than the retention period. Returns how many were deleted."""
    deleted = idempotency_records_purge(now=timezone.now())
    logger.info("purge_idempotency_records: %d records deleted", deleted)
    return deleted
