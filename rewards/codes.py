"""Voucher codes: 15 random characters of Crockford's base 32 (75 bits, unguessable) and a Damm check character,
which catches every single mistyped character and every swap of two neighbours at the till before the database is
asked. (Luhn mod 32 does not: like Luhn's missed 09/90, it misses a swapped 0Z/Z0.) Shown in groups of four
(ABCD-EFGH-JKMN-PQR7); read back forgivingly (case, dashes, spaces, and the letters people confuse with digits)."""

import secrets

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_CONFUSED = str.maketrans({"O": "0", "I": "1", "L": "1", "U": "V"})
RANDOM_LENGTH = 15
LENGTH = RANDOM_LENGTH + 1


def _times_two(value: int) -> int:
    """2·value in GF(32), modulo the irreducible x^5 + x^2 + 1."""
    doubled = value << 1
    return doubled ^ 0b100101 if doubled & 0b100000 else doubled


def _damm(code: str) -> int:
    # Damm's algorithm over the quasigroup c∘d = 2·c + d in GF(32): it is weakly totally anti-symmetric, because
    # 2·c + d = 2·d + c only when c = d (2 + 1 is not 0 there), which is what makes every adjacent swap show.
    interim = 0
    for char in code:
        interim = _times_two(interim) ^ _INDEX[char]
    return interim


def _check_character(body: str) -> str:
    """The character that brings the Damm interim of body + it back to 0."""
    return ALPHABET[_times_two(_damm(body))]


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
    return code if _damm(code) == 0 else None


def voucher_code_display(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))
