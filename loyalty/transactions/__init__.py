"""Purchases and returns from tills and web shops: each is recorded once and earns (or reverses) points once.

`common.py`: what recording takes and gives, and what purchases and returns share; `record.py`: transaction_record
and the purchase's path; `returns.py`: the return's."""

from loyalty.transactions.common import (
    CLOCK_SKEW,
    MAX_POINTS,
    TransactionInput,
    TransactionMismatch,
    TransactionResult,
    points_out_of_range,
)
from loyalty.transactions.record import transaction_preview, transaction_record, transaction_record_by_number

__all__ = [
    "CLOCK_SKEW",
    "MAX_POINTS",
    "TransactionInput",
    "TransactionMismatch",
    "TransactionResult",
    "points_out_of_range",
    "transaction_preview",
    "transaction_record",
    "transaction_record_by_number",
]
