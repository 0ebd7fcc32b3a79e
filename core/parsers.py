"""The API's request parsers (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES)."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser, with JSON nested too deeply for Python's parser ("[" * 100000) a parse error like any other
    malformed body: DRF turns only ValueError into ParseError, and the RecursionError escaped as a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
