"""The process log as JSON lines (`--log-format json`), for log pipelines that parse rather than grep.

Owns the shape of one line: `time` (UTC, RFC 3339 with milliseconds), `level`, `logger`, `message`,
and `exception` when one is attached. Nothing is configured at import; cli.py installs the handler.
"""

from __future__ import annotations

import json
import logging
import time


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % int(record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def json_handler() -> logging.Handler:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    return handler
