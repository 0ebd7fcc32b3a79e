"""Create an API client and print its key, once: only a hash of it is stored."""

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError, transaction

from core.models import ApiClient, Program


class Command(BaseCommand):
    help = "Create an API client for a programme and print its key once."

    def add_arguments(self, parser):
        parser.add_argument("name", help="What the client is, e.g. 'Store 12 till'.")
        parser.add_argument(
            "--scopes",
            nargs="+",
            required=True,
            metavar="SCOPE",
            help=f"One or more of: {', '.join(ApiClient.Scope.values)}; or 'all'.",
        )
        parser.add_argument("--program", default="DEFAULT", help="The programme's code (default: DEFAULT).")

    def handle(self, *args, name: str, scopes: list[str], program: str, **options):
        name = name.strip()
        if not name:
            raise CommandError("The name must not be empty.")
        max_name = ApiClient._meta.get_field("name").max_length
        if len(name) > max_name:
            raise CommandError(f"The name is longer than {max_name} characters.")
        granted = self._scopes(scopes)
        prog = Program.objects.filter(code=program).first()
        if prog is None:
            known = ", ".join(Program.objects.order_by("code").values_list("code", flat=True)) or "none"
            raise CommandError(f"No programme with code '{program}'. Known programmes: {known}.")

        client = ApiClient(program=prog, name=name, scopes=granted)
        raw_key = client.set_new_key()
        try:
            with transaction.atomic():
                client.save()
        except IntegrityError as exc:
            # The (program, name) constraint decides, so two commands run at once cannot both create the name.
            raise CommandError(f"The programme {prog.code} already has an API client named '{name}'.") from exc

        self.stdout.write(f"Created API client '{name}' for programme {prog.code} with scopes: {' '.join(granted)}")
        self.stdout.write("Its key is shown only now; store it safely:")
        self.stdout.write(raw_key)

    @staticmethod
    def _scopes(requested: list[str]) -> list[str]:
        if "all" in requested:
            if len(requested) > 1:
                raise CommandError("'all' cannot be combined with other scopes.")
            return list(ApiClient.Scope.values)
        unknown = [s for s in requested if s not in ApiClient.Scope.values]
        if unknown:
            raise CommandError(
                f"Unknown scope(s): {', '.join(unknown)}. Choose from: {', '.join(ApiClient.Scope.values)}, or 'all'."
            )
        return list(dict.fromkeys(requested))
