"""Voucher codes: 15 random characters of Crockford's base 32 (75 bits, unguessable) and a Luhn mod 32 check
character, which catches every single mistyped character and every swap of two neighbours at the till before the
database is asked. Shown in groups of four (ABCD-EFGH-JKMN-PQR7); read back forgivingly (case, dashes, spaces, and
the letters people confuse with digits)."""

import secrets

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_CONFUSED = str.maketrans({"O": "0", "I": "1", "L": "1", "U": "V"})
RANDOM_LENGTH = 15
LENGTH = RANDOM_LENGTH + 1


def _check_character(body: str) -> str:
    """Luhn mod N over the alphabet (N = 32), computed from the rightmost character."""
    n, total, factor = len(ALPHABET), 0, 2
    for char in reversed(body):
        addend = factor * _INDEX[char]
        total += addend // n + addend % n
        factor = 1 if factor == 2 else 2
    return ALPHABET[(n - total % n) % n]


def voucher_code_new() -> str:
    # One draw of 75 random bits, 5 per character: the same uniform code as 15 draws, at a tenth of the cost.
    bits = secrets.randbits(5 * RANDOM_LENGTH)
    body = "".join(ALPHABET[(bits >> (5 * i)) & 31] for i in range(RANDOM_LENGTH))
    return body + _check_character(body)


def voucher_code_normalize(raw: str) -> str | None:
    """The canonical code for what a till sent, or None when it cannot be a voucher code (wrong length or
    characters, or a check character that does not match)."""
    code = "".join(raw.split()).replace("-", "").upper().translate(_CONFUSED)
    if len(code) != LENGTH or any(c not in _INDEX for c in code):
        return None
    return code if _check_character(code[:-1]) == code[-1] else None


def voucher_code_display(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))
