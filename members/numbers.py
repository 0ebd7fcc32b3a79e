"""Public member numbers: nine random digits and a Luhn check digit, so a mistyped number is caught at the till."""

import secrets


def luhn_check_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # every second digit from the right, starting with the rightmost payload digit
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def is_valid_member_number(number: str) -> bool:
    return len(number) == 10 and number.isascii() and number.isdigit() and luhn_check_digit(number[:-1]) == number[-1]


def new_member_number() -> str:
    payload = str(secrets.randbelow(9 * 10**8) + 10**8)  # nine digits, never a leading zero
    return payload + luhn_check_digit(payload)
