import gc
import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

if settings.HOT_PATHS:
    from config.urls import hot_routes
    from core.hotpath import HotPaths

    application = HotPaths(application, hot_routes)

# Everything loaded so far (modules, settings, URL patterns: ~100,000 objects) lives as long as the process. Frozen,
# the garbage collector stops scanning it: a full collection held the interpreter lock for ~50 ms here, stalling
# every request of the worker (the p99 of bench/run's fixed-rate phase); frozen, collections take under 1 ms.
# Garbage left from loading is collected first, or it would be kept for good.
gc.collect()
gc.freeze()
