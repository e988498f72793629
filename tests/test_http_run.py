"""run(): the blocking CLI entry point stops gracefully on SIGINT/SIGTERM and returns normally.
Also: pyserve.http stays LLM-agnostic (imports nothing from api/engine/model)."""

from __future__ import annotations

import ast
import http.client
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SERVER = r"""
import logging, sys
from pyserve.http import ServerConfig, run

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            print(message["type"], flush=True)
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

run(app, ServerConfig(port=0))
print("run returned", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_gracefully_on_signal(signum: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        for line in proc.stderr:  # ends at EOF if the server dies
            if match := re.search(r"Serving HTTP on http://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port is not None, "server did not start"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"ok"
        conn.close()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["lifespan.startup", "lifespan.shutdown", "run", "returned"]
    assert "shutting down gracefully" in err


def test_http_package_imports_nothing_llm_specific() -> None:
    for path in (ROOT / "pyserve" / "http").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not re.match(r"(pyserve\.|\.\.)(api|engine|model|protocol)", name), (
                    f"{path.name} imports {name}")
