"""Periodic rewards jobs. Thin: the service finds what is due and does the work."""

import logging

from celery import shared_task
from django.conf import settings
from django.db import OperationalError
from django.utils import timezone

from rewards.services.holds import holds_lapse_due

logger = logging.getLogger(__name__)


@shared_task(
    name="rewards.tasks.lapse_holds",
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
    acks_late=True,
)
def lapse_holds() -> int:
    """Give back the points of open holds past their time. Safe to run twice (each hold is claimed by
    compare-and-set). Returns how many lapsed."""
    lapsed = holds_lapse_due(now=timezone.now(), batch_size=settings.LEDGER_BATCH_SIZE)
    logger.info("lapse_holds: %d holds lapsed", lapsed)
    return lapsed
