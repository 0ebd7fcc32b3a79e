import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

if settings.HOT_PATHS:
    from config.urls import hot_routes
    from core.hotpath import HotPaths

    application = HotPaths(application, hot_routes)
