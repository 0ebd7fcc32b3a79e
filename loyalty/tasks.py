"""Periodic ledger jobs. Thin: the ledger finds what is due and does the work; these only wake it, log and retry.

Both jobs are safe to run twice or concurrently (the ledger re-reads due lots after locking their accounts), which
is what makes `acks_late` safe: a job redelivered after a worker died simply finds less, or nothing, to do."""

import logging

from celery import shared_task
from django.conf import settings
from django.db import OperationalError
from django.utils import timezone

from loyalty.ledger import ledger_expire_due, ledger_mature_due

logger = logging.getLogger(__name__)

# A lost connection or a failover is worth retrying; anything else is a bug that retrying would only repeat.
RETRY = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 5,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 5,
    "acks_late": True,
}


@shared_task(name="loyalty.tasks.mature_pending_points", **RETRY)
def mature_pending_points() -> int:
    """Make pending points whose time has come spendable. Returns how many lots matured."""
    matured = ledger_mature_due(now=timezone.now(), batch_size=settings.LEDGER_BATCH_SIZE)
    logger.info("mature_pending_points: %d lots matured", matured)
    return matured


@shared_task(name="loyalty.tasks.expire_points", **RETRY)
def expire_points() -> int:
    """Expire what is left of lots past their expiry. Returns how many lots expired."""
    expired = ledger_expire_due(now=timezone.now(), batch_size=settings.LEDGER_BATCH_SIZE)
    logger.info("expire_points: %d lots expired", expired)
    return expired


@shared_task(name="loyalty.tasks.review_tiers", **RETRY)
def review_tiers() -> dict:
    """Move members whose tier review (plus grace) is due, and end manual tiers past their end date. Safe to run
    twice or concurrently: reviewed members' review dates move on, and batches skip rows another run holds."""
    from loyalty.tiers import tiers_review_due

    result = tiers_review_due(now=timezone.now(), batch_size=settings.TIER_REVIEW_BATCH_SIZE)
    logger.info(
        "review_tiers: %d reviewed, %d changed, %d manual tiers ended",
        result.reviewed,
        result.changed,
        result.manual_expired,
    )
    return {"reviewed": result.reviewed, "changed": result.changed, "manual_expired": result.manual_expired}
