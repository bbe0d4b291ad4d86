"""/server_info: version, state, uptime and the options the process runs with, in Envoy's shape."""

from __future__ import annotations

import dataclasses
import json
import time

from laneproxy.admin import web

from laneproxy import BUILD, __version__
from laneproxy.admin.endpoint import AdminEndpoint, context


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


async def server_info(request: web.Request) -> web.Response:
    proxy = context(request).proxy
    uptime = f"{int(time.time() - proxy.started_at)}s"
    document = {
        "version": f"laneproxy/{__version__}",
        "state": proxy.state,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "hot_restart_version": "disabled",
        "command_line_options": {**_jsonable(proxy.settings), "concurrency": 1},
        "node": {"id": "", "cluster": "", "user_agent_name": "laneproxy",
                 "user_agent_build_version": {"version": dict(zip(("major_number", "minor_number", "patch"),
                                                                  map(int, __version__.split(".")[:3])))}},
        "config_version": proxy.store.current.version,
        # Not Envoy's: which build of the hot path runs (compiled extensions or pure Python) and why.
        "laneproxy_build": {"compiled": BUILD.compiled, "detail": str(BUILD)},
    }
    return web.Response(text=json.dumps(document, indent=1), content_type="application/json")


ENDPOINTS = (AdminEndpoint("/server_info", "print server version/status information", server_info),)
