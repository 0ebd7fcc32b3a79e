"""The API client of the tests, which serves requests as production does (config/wsgi.py): a hot route first
(core/hotpath.py), the full Django stack for everything else and for whatever a hot view declines."""

from django.conf import settings
from rest_framework.test import APIClient as DrfAPIClient
from rest_framework.test import ForceAuthClientHandler

from config.urls import hot_routes
from core.hotpath import HotPaths

_hot = HotPaths(None, hot_routes)


class _Handler(ForceAuthClientHandler):
    def __call__(self, environ):
        route = _hot.route(environ) if settings.HOT_PATHS else None
        response = _hot.respond(environ, route) if route else None
        if response is None:
            return super().__call__(environ)
        response.served_hot = True  # what production's HotPaths would have answered
        return response


class APIClient(DrfAPIClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handler = _Handler(enforce_csrf_checks=False)
