from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Programme and integration"

    def ready(self):
        from django.db.backends.signals import connection_created

        import core.schema  # noqa: F401  registers the OpenAPI description of API keys
        from core.db import statements_kept_when_marked, timestamps_loaded_natively

        connection_created.connect(timestamps_loaded_natively)
        connection_created.connect(statements_kept_when_marked)
