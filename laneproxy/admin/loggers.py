"""/logging: show and change log levels at run time, with Envoy's parameters and level names.

POST only. `?level=debug` changes every laneproxy logger (and the root logger); `?paths=a:debug,b:info`
or `?<logger>=<level>` change the named ones. The answer lists the active loggers, as Envoy's does.
"""

from __future__ import annotations

import logging

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, text

# Envoy's level names -> Python levels; `trace` is below DEBUG, `off` above CRITICAL.
LEVELS = {"trace": 5, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}
_NAMES = {5: "trace", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "critical", logging.CRITICAL + 10: "off"}
_USAGE = ("usage: /logging?<name>=<level> (change single level)\n"
          "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
          "usage: /logging?level=<level> (change all levels)\n"
          "levels: trace debug info warning error critical off \n")


def active_loggers() -> dict[str, logging.Logger]:
    loggers = {"root": logging.getLogger()}
    for name in sorted(logging.root.manager.loggerDict):
        logger = logging.root.manager.loggerDict[name]
        if isinstance(logger, logging.Logger) and (name == "laneproxy" or name.startswith(("laneproxy.", "aiohttp"))):
            loggers[name] = logger
    loggers.setdefault("laneproxy", logging.getLogger("laneproxy"))
    return loggers


def listing() -> str:
    lines = ["active loggers:"]
    for name, logger in sorted(active_loggers().items()):
        level = logger.getEffectiveLevel()
        lines.append(f"  {name}: {_NAMES.get(level, logging.getLevelName(level).lower())}")
    return "\n".join(lines) + "\n"


async def logging_handler(request: web.Request) -> web.Response:
    loggers = active_loggers()
    changes: list[tuple[str, str]] = []
    for key, value in request.query.items():
        if key == "level":
            changes += [(name, value) for name in loggers]
        elif key == "paths":
            for part in value.split(","):
                name, _, level = part.partition(":")
                changes.append((name.strip(), level.strip()))
        else:
            changes.append((key, value))
    for name, level in changes:
        if level.lower() not in LEVELS:
            return text("error: unknown logger level\n\n" + _USAGE + listing(), status=400)
        if name not in loggers:
            return text(f"error: unknown logger name {name}\n\n" + _USAGE + listing(), status=400)
    for name, level in changes:
        loggers[name].setLevel(LEVELS[level.lower()])
    return text(listing())


ENDPOINTS = (
    AdminEndpoint("/logging", "query/change logging levels", logging_handler, mutates=True, params=(
        ("paths", "Change multiple logging levels by setting to <logger_name1>:<desired_level1>,..."),
        ("level", "desired logging level, this will change all loggers's level; One of (trace, debug, info, "
                  "warning, error, critical, off)"),
    )),
)
