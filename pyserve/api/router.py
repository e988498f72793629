"""A hand-rolled router: (method, path) -> handler.

Patterns are literal paths with `{name}` (one segment) or `{name:path}` (the rest of the path,
slashes included — model ids like "org/model" need it). Unknown path -> 404; known path with the
wrong method -> 405 carrying an Allow header. HEAD is served by the GET handler (the HTTP server
sends the head without the body).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pyserve.protocol.errors import ProtocolError

Handler = Callable[[Any], Awaitable[None]]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


@dataclass
class Route:
    pattern: str
    regex: re.Pattern[str]
    handlers: dict[str, Handler]


def _compile(pattern: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PARAM.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []
        # (method, path) -> handler for the literal patterns: one dict lookup for the common
        # requests instead of a regex per route.
        self._exact: dict[tuple[str, str], Handler] = {}

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        method = method.upper()
        if not _PARAM.search(pattern):
            self._exact[(method, pattern)] = handler
            if method == "GET":
                self._exact.setdefault(("HEAD", pattern), handler)
        for route in self._routes:
            if route.pattern == pattern:
                route.handlers[method] = handler
                return
        self._routes.append(Route(pattern, _compile(pattern), {method: handler}))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; ProtocolError 404/405 when nothing fits."""
        handler = self._exact.get((method, path))
        if handler is not None:
            return handler, {}
        allowed: set[str] = set()
        for route in self._routes:
            m = route.regex.match(path)
            if m is None:
                continue
            handler = route.handlers.get(method.upper())
            if handler is None and method.upper() == "HEAD":
                handler = route.handlers.get("GET")
            if handler is not None:
                return handler, m.groupdict()
            allowed.update(route.handlers)
            if "GET" in route.handlers:
                allowed.add("HEAD")
        if allowed:
            allow = ", ".join(sorted(allowed))
            raise ProtocolError(
                f"Method {method} is not allowed for {path} (allowed: {allow}).",
                status=405,
                headers=[("allow", allow)],
            )
        raise ProtocolError(f"Invalid URL ({method} {path}): no such route.", status=404)
