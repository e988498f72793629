"""pyserve as a plain ASGI 3 application, for any ASGI server or host app.

    PYSERVE_ARGS='MODEL --mode server --api-key sk-x' uvicorn --factory pyserve.asgi:create_app

`create_app()` with no arguments reads the same flags as `python -m pyserve` from the environment
variable PYSERVE_ARGS (shell-quoted; empty or unset: the bundled model with default settings).
From Python, pass them as keyword arguments instead (names as the flags', with underscores), and
mount the result wherever an ASGI app goes:

    from pyserve.asgi import create_app
    llm = create_app("path/to/model.gguf", mode="server", api_key="sk-x", allow_origins=[],
                     max_tokens_limit=512)
    host = Starlette(routes=[Mount("/llm", app=llm)], lifespan=llm.lifespan)

The model is loaded and the engine built when create_app returns; the engine loop runs with the
ASGI lifespan (or, when the host runs none, from the first request). Flags of pyserve's own HTTP
server (host, port, timeouts, connection limits) have no effect here: the ASGI server decides.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from typing import Any, Sequence

from pyserve import cli

log = logging.getLogger("pyserve")

ENV_VAR = "PYSERVE_ARGS"


def _option_tokens(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if value is True:
        return [flag]
    if value is False:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, json.dumps([str(v) for v in value])]
    return [flag, str(value)]


def args_from(model: str | None = None, argv: Sequence[str] | str | None = None, **options: Any) -> Any:
    """The parsed flags: `argv` (a list or a shell-quoted string; default: $PYSERVE_ARGS when no
    model and no options are given), then `model` and keyword `options` on top. Raises
    cli.ArgumentError (a ValueError) for a bad flag or an unknown option."""
    if argv is None:
        argv = os.environ.get(ENV_VAR, "") if model is None and not options else ()
    tokens = shlex.split(argv) if isinstance(argv, str) else list(argv)
    known = {a.dest for a in cli.build_parser()._actions}
    for name, value in options.items():
        if name not in known or name in ("help", "model"):
            raise cli.ArgumentError(f"unknown option {name!r} (options are the flags of `python -m pyserve`)")
        tokens += _option_tokens(name, value)
    if model is not None:
        tokens = [os.fspath(model), *tokens]
    return cli.parse_args(tokens, exit_on_error=False)


def create_app(model: str | None = None, argv: Sequence[str] | str | None = None, **options: Any) -> Any:
    """Load the model and return the ASGI app (pyserve.api.App) configured by the flags.

    With no arguments the flags come from $PYSERVE_ARGS (what `uvicorn --factory` needs).
    Raises cli.ArgumentError for bad flags, cli.BuildError when the model cannot be loaded."""
    args = args_from(model, argv, **options)
    cli.setup_logging(args.log_level)  # a no-op where the host (uvicorn) configured logging
    ignored = [f"--{n.replace('_', '-')}" for n in cli.SERVER_FLAGS
               if getattr(args, n) != cli.build_parser().get_default(n)]
    if ignored:
        log.warning("ignored under another ASGI server (it decides these): %s", ", ".join(ignored))
    return cli.build_app(args)


__all__ = ["create_app", "args_from", "ENV_VAR"]
