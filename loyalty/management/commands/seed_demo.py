"""Demo data for the embedded default: a staff login, an all-scopes API key and a few hundred members with real
purchase histories (the CDNOW sample, see demo/README.md). Safe to run again: nothing is duplicated."""

import secrets
import unicodedata
import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone
from tqdm import tqdm

from core.errors import ApplicationError, MemberNotFound
from core.models import ApiClient, Program
from loyalty.event_services import event_type_create
from loyalty.ledger import ledger_expire_due, ledger_mature_due
from loyalty.models import Account, Tier, Transaction
from loyalty.rule_services import earning_rule_create
from loyalty.tier_setup import program_settings_update, tier_create
from loyalty.transactions import TransactionInput, transaction_record
from members.models import Member
from members.selectors import member_lookup
from members.services import member_enroll
from rewards.services.catalogue import reward_create

DATA_FILE = settings.BASE_DIR / "demo" / "cdnow_sample.txt"
PROGRAM_CODE = "DEFAULT"
ADMIN_USERNAME = "admin"
CLIENT_NAME = "demo-pos"
SOURCE = "seed_demo"
EXTERNAL_CHANNEL = "cdnow"
# The sample spans 18 months; with the default 24-month expiry nothing would have expired yet, and the demo is meant
# to show live, expiring and expired points side by side.
DEMO_EXPIRY_MONTHS = 12
LAST_PURCHASE_DAYS_AGO = 7
DOLLARS_TO_SEK = Decimal(10)

STORES = ("stockholm-drottninggatan", "goteborg-avenyn", "malmo-sodergatan", "oslo-karl-johan", "web")
FIRST_NAMES = (
    "Astrid", "Erik", "Ingrid", "Lars", "Karin", "Anders", "Sigrid", "Johan", "Maja", "Nils", "Elsa", "Olof",
    "Freja", "Björn", "Linnea", "Magnus", "Solveig", "Henrik", "Kari", "Øystein", "Ragnhild", "Sven", "Tove",
    "Gustav", "Emma", "Oscar", "Alice", "Liam", "Nora", "Jakob",
)  # fmt: skip
LAST_NAMES = (
    "Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Olsson", "Persson", "Svensson",
    "Lindqvist", "Berg", "Hansen", "Johansen", "Olsen", "Larsen", "Haugen", "Bakken", "Dahl", "Lund", "Strand",
    "Åberg", "Sjöberg", "Ødegård", "Smith", "Brown",
)  # fmt: skip
# Numbers the Swedish regulator (PTS) reserves for fiction: valid, and they reach nobody.
FICTIONAL_PHONES = [f"+467017406{n:02d}" for n in range(5, 100)]


@dataclass(frozen=True)
class Purchase:
    customer: str
    seq: int  # the purchase's number in the customer's history, which keys it for idempotency
    day: date
    cds: int
    dollars: Decimal


DEMO_TIERS = [
    (
        "SILVER",
        1,
        1000,
        "1.10",
        ("Silver", "Silver", "Sølv"),
        ("10% more points", "10 % fler poäng", "10 % flere poeng"),
    ),
    (
        "GOLD",
        2,
        3000,
        "1.25",
        ("Gold", "Guld", "Gull"),
        ("25% more points, free delivery", "25 % fler poäng, fri frakt", "25 % flere poeng, gratis frakt"),
    ),
]
DEMO_RULES = [
    {"code": "weekend", "name": "Weekend bonus", "days_of_week": [6, 7], "benefit": "fixed", "value": Decimal(20)},
    {
        "code": "big-basket",
        "name": "Big basket",
        "min_basket": Decimal("500.00"),
        "benefit": "fixed",
        "value": Decimal(50),
        "member_limit": 200,
        "member_limit_period": "month",
    },
    {"code": "welcome", "name": "Welcome", "first_purchase": True, "benefit": "fixed", "value": Decimal(100)},
    {
        "code": "birthday",
        "name": "Birthday month",
        "birthday_month": True,
        "benefit": "multiplier",
        "value": Decimal(2),
        "member_limit": 500,
        "member_limit_period": "year",
    },
]
DEMO_EVENTS = [
    {
        "code": "profile-completed",
        "name": "Profile completed",
        "points": 100,
        "member_limit": 1,
        "member_limit_period": "ever",
    },
    {
        "code": "product-review",
        "name": "Product review",
        "points": 20,
        "member_limit": 5,
        "member_limit_period": "month",
    },
]
DEMO_REWARDS = [
    {
        "code": "voucher-50",
        "kind": "discount",
        "points_cost": 500,
        "discount_amount": Decimal("50.00"),
        "min_basket": Decimal("200.00"),
        "name_en": "50 SEK off",
        "name_sv": "50 kr rabatt",
        "name_nb": "50 kr rabatt",
    },
    {
        "code": "free-cd",
        "kind": "product",
        "points_cost": 1200,
        "product_sku": "CD-ANY",
        "name_en": "A CD of your choice",
        "name_sv": "Valfri cd",
        "name_nb": "Valgfri cd",
        "member_limit": 1,
        "member_limit_period": "month",
    },
    {
        "code": "concert",
        "kind": "experience",
        "points_cost": 5000,
        "stock": 20,
        "min_tier_rank": 2,
        "name_en": "Concert evening for two",
        "name_sv": "Konsertkväll för två",
        "name_nb": "Konsertkveld for to",
    },
    {
        "code": "red-cross",
        "kind": "donation",
        "points_cost": 100,
        "partner": "Red Cross",
        "name_en": "Give 10 SEK to the Red Cross",
        "name_sv": "Ge 10 kr till Röda korset",
        "name_nb": "Gi 10 kr til Røde Kors",
    },
]


def read_sample(path: Path, *, customers: int) -> dict[str, list[Purchase]]:
    """The purchases of the first `customers` customers of the CDNOW file, in file order."""
    if not path.is_file():
        raise CommandError(f"The demo data file {path} is missing.")
    histories: dict[str, list[Purchase]] = {}
    with path.open(encoding="ascii") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                customer, _sample, day, cds, dollars = line.split()
                parsed_day = datetime.strptime(day, "%Y%m%d").date()
                parsed_cds, parsed_dollars = int(cds), Decimal(dollars)
            except (ValueError, InvalidOperation) as exc:
                raise CommandError(f"{path}:{number}: not 'customer sample YYYYMMDD cds dollars': {line!r}") from exc
            if parsed_cds < 0 or parsed_dollars < 0:
                raise CommandError(f"{path}:{number}: negative quantity or value: {line!r}")
            if customer not in histories:
                if len(histories) == customers:
                    break
                histories[customer] = []
            history = histories[customer]
            history.append(Purchase(customer, len(history) + 1, parsed_day, parsed_cds, parsed_dollars))
    if not histories:
        raise CommandError(f"{path} holds no purchases.")
    return histories


def _ascii(name: str) -> str:
    folded = name.replace("Ø", "O").replace("ø", "o")
    return unicodedata.normalize("NFKD", folded).encode("ascii", "ignore").decode().lower()


def _profile(customer: str, index: int) -> dict:
    """A made-up but stable identity for a CDNOW customer id (the sample has no names)."""
    cid = int(customer)
    first, last = FIRST_NAMES[cid * 7 % len(FIRST_NAMES)], LAST_NAMES[cid * 13 % len(LAST_NAMES)]
    locale = ("sv", "sv", "nb", "en")[cid % 4]
    phone = FICTIONAL_PHONES[index] if index < len(FICTIONAL_PHONES) else None
    return {
        "email": f"{_ascii(first)}.{_ascii(last)}.{customer}@example.com",
        "phone": phone,
        "first_name": first,
        "last_name": last,
        "locale": locale,
        "timezone": "Europe/Oslo" if locale == "nb" else "Europe/Stockholm",
        "external_ids": {EXTERNAL_CHANNEL: customer},
        "cards": [f"7350{cid:08d}"],
        "consents": {"email": cid % 3 != 0, "sms": phone is not None and cid % 2 == 0, "push": False},
    }


class Command(BaseCommand):
    help = "Load demo data (staff login, API key, members with purchases from the CDNOW sample). Idempotent."

    def add_arguments(self, parser):
        parser.add_argument(
            "--customers", type=int, default=300, help="How many CDNOW customers to enrol (default 300, at most 2357)."
        )

    def handle(self, *args, customers: int, **options):
        if not 1 <= customers <= 10_000:
            raise CommandError("--customers must be between 1 and 10000.")
        program = Program.objects.filter(code=PROGRAM_CODE).first()
        if program is None:
            raise CommandError(f"No programme {PROGRAM_CODE}: run `python manage.py migrate` first.")
        histories = read_sample(DATA_FILE, customers=customers)

        notes = [self._configure_program(program), self._ensure_admin()]
        notes.append(self._ensure_client(program))
        notes.append(self._ensure_catalogue(program))
        self._load_members(program, histories)
        now = timezone.now()
        matured = ledger_mature_due(now=now, batch_size=settings.LEDGER_BATCH_SIZE)
        expired = ledger_expire_due(now=now, batch_size=settings.LEDGER_BATCH_SIZE)
        self.stdout.write(f"Ledger jobs: {matured} lots matured, {expired} lots expired.")
        self._summary(program)
        self.stdout.write("")
        for note in filter(None, notes):
            self.stdout.write(note)

    def _configure_program(self, program: Program) -> str:
        if Transaction.objects.filter(program=program).exists() or program.expiry_months == DEMO_EXPIRY_MONTHS:
            return ""
        program.expiry_months = DEMO_EXPIRY_MONTHS
        program.save(update_fields=["expiry_months", "updated_at"])
        return (
            f"Programme {program.code}: points now expire after {DEMO_EXPIRY_MONTHS} months (change it in the admin)."
        )

    def _ensure_catalogue(self, program: Program) -> str:
        """A tier scheme, earning rules, event types and rewards, created through their services once."""
        if Tier.objects.filter(program=program).exists():
            return ""
        program_settings_update(program=program, tier_measure="points", tier_window="rolling", tier_window_months=12)
        for code, rank, threshold, multiplier, names, perks in DEMO_TIERS:
            tier_create(
                program=program,
                code=code,
                rank=rank,
                threshold=Decimal(threshold),
                earn_multiplier=Decimal(multiplier),
                **{f"name_{lang}": name for lang, name in zip(("en", "sv", "nb"), names, strict=True)},
                **{f"perks_{lang}": perk for lang, perk in zip(("en", "sv", "nb"), perks, strict=True)},
            )
        for fields in DEMO_RULES:
            earning_rule_create(program=program, **fields)
        for fields in DEMO_EVENTS:
            event_type_create(program=program, **fields)
        for fields in DEMO_REWARDS:
            reward_create(program=program, **fields)
        return (
            f"Demo catalogue: {len(DEMO_TIERS)} tiers, {len(DEMO_RULES)} earning rules, {len(DEMO_EVENTS)} event "
            f"types and {len(DEMO_REWARDS)} rewards (change them in the admin)."
        )

    def _ensure_admin(self) -> str:
        users = get_user_model()
        if users.objects.filter(username=ADMIN_USERNAME).exists():
            return f"Staff login: user '{ADMIN_USERNAME}' exists already (its password is unchanged)."
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(ADMIN_USERNAME, email="admin@example.com", password=password)
        return f"Staff login (shown once): user '{ADMIN_USERNAME}', password '{password}'."

    @transaction.atomic
    def _ensure_client(self, program: Program) -> str:
        client = ApiClient.objects.select_for_update().filter(program=program, name=CLIENT_NAME).first()
        created = client is None
        if created:
            client = ApiClient(program=program, name=CLIENT_NAME)
        # A re-run rotates the key so that the printout is always one that works; the old key stops working.
        raw_key = client.set_new_key()
        client.scopes = list(ApiClient.Scope.values)
        client.revoked_at = None
        client.save()
        verb = "created" if created else "exists already; its key was rotated"
        return (
            f"API client '{CLIENT_NAME}' {verb} (all scopes). API key: {raw_key}\n"
            f"  try: curl -H 'Authorization: Api-Key {raw_key}' http://127.0.0.1:8000/api/v1/program"
        )

    def _load_members(self, program: Program, histories: dict[str, list[Purchase]]) -> None:
        last_day = max(p.day for history in histories.values() for p in history)
        shift = (timezone.localdate() - timedelta(days=LAST_PURCHASE_DAYS_AGO)) - last_day
        counts = {"enrolled": 0, "existing": 0, "recorded": 0, "replayed": 0, "inactive": 0}
        progress = tqdm(histories.items(), total=len(histories), unit="member", desc="Demo members", disable=None)
        for index, (customer, history) in enumerate(progress):
            try:
                self._load_member(program, customer, index, history, shift, counts)
            except ApplicationError as exc:
                raise CommandError(f"CDNOW customer {customer}: {exc.detail} {exc.errors or ''}".strip()) from exc
        self.stdout.write(
            f"Members: {counts['enrolled']} enrolled, {counts['existing']} already there"
            + (f", {counts['inactive']} not active (skipped)" if counts["inactive"] else "")
            + f". Purchases: {counts['recorded']} recorded, {counts['replayed']} already there."
        )

    @transaction.atomic
    def _load_member(self, program, customer, index, history, shift, counts) -> None:
        """One member and their purchases, all or nothing."""
        profile = _profile(customer, index)
        tz = zoneinfo.ZoneInfo(profile["timezone"])

        def when(purchase: Purchase) -> datetime:
            # Spread over opening hours, deterministically, so re-runs on the same day give the same times.
            hour = 10 + (int(customer) + purchase.seq) % 9
            return datetime.combine(purchase.day + shift, time(hour, 7 * purchase.seq % 60), tzinfo=tz)

        try:
            member = member_lookup(program=program, external_id=customer, channel=EXTERNAL_CHANNEL)
            counts["existing"] += 1
        except MemberNotFound:
            store = STORES[int(customer) % len(STORES)]
            member = member_enroll(
                program=program,
                enrollment_channel="web" if store == "web" else "pos",
                source=SOURCE,
                now=when(history[0]),
                **profile,
            )
            counts["enrolled"] += 1
        if member.status != Member.Status.ACTIVE:
            counts["inactive"] += 1
            return
        store = STORES[int(customer) % len(STORES)]
        for purchase in history:
            total = (purchase.dollars * DOLLARS_TO_SEK).quantize(Decimal("0.01"))
            occurred_at = when(purchase)
            result = transaction_record(
                program=program,
                data=TransactionInput(
                    store=store,
                    external_id=f"cdnow-{customer}-{purchase.seq}",
                    channel="web" if store == "web" else "pos",
                    kind=Transaction.Kind.PURCHASE,
                    occurred_at=occurred_at,
                    currency=program.currency,
                    total=total,
                    lines=[
                        {
                            "sku": "CD",
                            "category": "music",
                            "quantity": purchase.cds,
                            "unit_price": str((total / max(purchase.cds, 1)).quantize(Decimal("0.01"))),
                            "amount": str(total),
                        }
                    ],
                    member=member,
                ),
                # Recorded as the till would have sent it at the time, so the history reads as it happened.
                now=occurred_at,
            )
            counts["recorded" if result.created else "replayed"] += 1

    def _summary(self, program: Program) -> None:
        accounts = Account.objects.filter(member__program=program)
        alive = accounts.filter(available__gt=0).count()
        total = sum(accounts.values_list("available", flat=True))
        self.stdout.write(
            f"Programme {program.code}: {Member.objects.filter(program=program).count()} members, "
            f"{alive} with points to spend, {total} points available in all."
        )
