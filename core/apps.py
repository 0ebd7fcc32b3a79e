from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Programme and integration"

    def ready(self):
        import core.schema  # noqa: F401  registers the OpenAPI description of API keys
