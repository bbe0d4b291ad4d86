"""/ and /help: what the admin server offers, as an HTML page of links and as Envoy's plain-text list."""

from __future__ import annotations

import html

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, help_text, text


async def home(request: web.Request) -> web.Response:
    rows = []
    for endpoint in context(request).endpoints:
        path = html.escape(endpoint.path)
        if endpoint.mutates:
            link = f"<form action='{path}' method='post'><button>{path}</button></form>"
        else:
            link = f"<a href='{path}'>{path}</a>"
        rows.append(f"<tr><td>{link}</td><td>{html.escape(endpoint.help)}</td></tr>")
    page = ("<!DOCTYPE html>\n<html lang='en'>\n<head><title>laneproxy admin</title></head>\n<body>\n"
            "<table class='home-table'>\n" + "\n".join(rows) + "\n</table>\n</body>\n</html>\n")
    return web.Response(text=page, content_type="text/html", charset="UTF-8")


async def help_page(request: web.Request) -> web.Response:
    return text(help_text(context(request).endpoints))


ENDPOINTS = (
    AdminEndpoint("/", "Admin home page", home),
    AdminEndpoint("/help", "print out list of admin commands", help_page),
)
