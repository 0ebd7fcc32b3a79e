"""The API client of the tests, which serves requests as production does (config/wsgi.py): a hot route first
(core/hotpath.py), the full Django stack for everything else and for whatever a hot view declines."""

from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from rest_framework.test import APIClient as DrfAPIClient
from rest_framework.test import ForceAuthClientHandler

from config.urls import hot_routes
from core.hotpath import HotPaths

_hot = HotPaths(None, hot_routes)


class _Handler(ForceAuthClientHandler):
    def __call__(self, environ):
        route = _hot.route(environ) if settings.HOT_PATHS else None
        answer = _hot.respond(environ, route) if route else None
        if answer is None:
            return super().__call__(environ)
        response = answer.as_response()
        response.served_hot = True  # what production's HotPaths would have answered
        response.wsgi_request = WSGIRequest(environ)  # as Django's test handler sets it
        return response


class APIClient(DrfAPIClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handler = _Handler(enforce_csrf_checks=False)
