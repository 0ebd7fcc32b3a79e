"""Referral codes: short, random, and made of characters that cannot be mistaken for each other when read aloud or
typed from a screen (no 0/O, 1/I/L)."""

import secrets

ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
LENGTH = 8  # 31**8, about 8.5e11 codes: collisions are rare, and retried.


def new_referral_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def normalize_referral_code(value: str) -> str:
    """The code as stored: upper case, without the spaces and dashes people add when copying it."""
    return value.strip().upper().replace(" ", "").replace("-", "")
