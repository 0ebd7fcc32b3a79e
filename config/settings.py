"""Settings, all from the environment (see .env.example). With nothing set, the service runs on an embedded
default: an SQLite file, Celery tasks run inline, a local-memory cache."""

from pathlib import Path

import environ
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="insecure-embedded-default-change-me")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from here, not from a CDN
    "core",
    "members",
    "loyalty",
    "rewards",
]

MIDDLEWARE = [
    "core.db.KeepPreparedStatementsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "core.idempotency.IdempotencyMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: PostgreSQL through psycopg 3 when DATABASE_URL is set, an SQLite file otherwise.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=600)
# Off by default: the check is a `SELECT 1` round trip on every request (about a third of a purchase's app CPU in
# bench/run). Without it, the first request on each pooled connection after a database restart fails once; clients
# retry, and a 5xx releases its Idempotency-Key claim so the retry runs.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DB_CONN_HEALTH_CHECKS", default=False)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Server-side binding, and psycopg preparing a statement once a connection has run it 5 times: PostgreSQL then
    # skips parsing and planning it. On a purchase this halves the database's CPU and saves the client-side quoting
    # of every parameter (docs/benchmarks.md). Behind a pooler in transaction mode, prepared statements need
    # PgBouncer >= 1.21 with max_prepared_statements, or DB_PREPARED_STATEMENTS=false.
    DATABASES["default"]["OPTIONS"] = {
        "server_side_binding": env.bool("DB_SERVER_SIDE_BINDING", default=True),
        "prepare_threshold": 5 if env.bool("DB_PREPARED_STATEMENTS", default=True) else None,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Wait for the write lock instead of failing at once when two requests write together.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    # SQLite cannot make the tier counters' covering index; it keeps the unique index without the extra columns.
    SILENCED_SYSTEM_CHECKS = ["models.W039"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: Celery broker and cache when REDIS_URL is set; inline tasks and a local-memory cache otherwise.
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    CELERY_BROKER_URL = REDIS_URL
    CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_TIMEZONE = "UTC"
# The jobs themselves find what is due in the database; the beat only wakes them.
CELERY_BEAT_SCHEDULE = {
    "mature-pending-points": {"task": "loyalty.tasks.mature_pending_points", "schedule": 60.0},
    "expire-points": {"task": "loyalty.tasks.expire_points", "schedule": crontab(minute="*/15")},
    "review-tiers": {"task": "loyalty.tasks.review_tiers", "schedule": crontab(minute=23)},
    "lapse-holds": {"task": "rewards.tasks.lapse_holds", "schedule": 60.0},
    "purge-idempotency-records": {
        "task": "core.tasks.purge_idempotency_records",
        "schedule": crontab(hour=3, minute=7),
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("sv", "Svenska"), ("nb", "Norsk bokmål")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["core.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["core.auth.HasScopes"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["core.parsers.JSONParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "core.pagination.CursorPagination",
    "DEFAULT_SCHEMA_CLASS": "core.schema.AutoSchema",
    "EXCEPTION_HANDLER": "core.errors.problem_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "COERCE_DECIMAL_TO_STRING": True,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Loyalty API",
    "DESCRIPTION": "Integration contract v1 for retail POS systems, web shops and survey tools.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "core.schema.add_problem_responses",
    ],
    "ENUM_NAME_OVERRIDES": {
        "MemberStatusEnum": "members.models.Member.Status",
        "MemberLocaleEnum": "members.models.Member.Locale",
        "EntryKindEnum": "loyalty.models.Entry.Kind",
        "TransactionTypeEnum": "loyalty.models.Transaction.Kind",
        "LimitPeriodEnum": "loyalty.rule_models.Period",
        "RewardKindEnum": "rewards.models.Reward.Kind",
        "RewardLimitPeriodEnum": "rewards.models.Reward.Period",
    },
}

# The loyalty domain.
LOYALTY_DEFAULT_CURRENCY = env.str("LOYALTY_DEFAULT_CURRENCY", default="SEK")
# Keyed hash of API keys: a separate secret, so rotating SECRET_KEY does not revoke every key.
API_KEY_HASH_SECRET = env.str("API_KEY_HASH_SECRET", default=SECRET_KEY)
# How long an authenticated API client is remembered in-process; a revoked key stops working within this time.
API_CLIENT_CACHE_SECONDS = env.int("API_CLIENT_CACHE_SECONDS", default=5)
LEDGER_BATCH_SIZE = env.int("LEDGER_BATCH_SIZE", default=1000)
TIER_REVIEW_BATCH_SIZE = env.int("TIER_REVIEW_BATCH_SIZE", default=10000)
TIER_REVIEW_WORKERS = env.int("TIER_REVIEW_WORKERS", default=2)
# Lanes of members that import_transactions writes at once, each on its own database connection.
IMPORT_WRITERS = env.int("IMPORT_WRITERS", default=2)
# Processes that check a large import file at once, each a part of it (loyalty/imports/checking.py).
IMPORT_CHECKERS = env.int("IMPORT_CHECKERS", default=2)
TRANSACTION_BATCH_MAX = 1000
# The largest request body read, in bytes (Django's default, 2.5 MB, refused a full batch). A batch of
# TRANSACTION_BATCH_MAX purchases of 25 lines each is about 3 MB with everyday values; with every text as long as it
# may be (sku and category 64 characters, external_id 128) and every amount at its largest it is
# 1,000 x (395 + 25 x 244) bytes = 6.5 MB (tests/test_api_input.py). 10 MiB leaves room for longer baskets; it bounds
# every request's memory, so change it with the batch size.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=10 * 1024 * 1024)
# Serve the till's hottest calls (hot_routes in config/urls.py) without the middleware chain and DRF dispatch:
# core/hotpath.py.
HOT_PATHS = env.bool("HOT_PATHS", default=True)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
LOYALTY_DEFAULT_REGION = env.str("LOYALTY_DEFAULT_REGION", default="SE")
RULES_CACHE_SECONDS = env.int("RULES_CACHE_SECONDS", default=2)
