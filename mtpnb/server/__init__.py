"""`mtpnb serve`: an OpenAI-compatible HTTP server for one model, with MTP token kinds in the stream.

    python -m mtpnb.server MODEL --port 8000            # or: mtpnb serve MODEL
    from mtpnb.server import Server
    with Server(model, port=0) as server:                # in-process, on a thread
        print(server.url)

The wire format and its extension fields: mtpnb/server/protocol.py. The client: mtpnb.connect.
Imports stay lazy so that `import mtpnb.server` costs nothing until a server starts.
"""

from __future__ import annotations

__all__ = ["Server", "add_serve_arguments", "build_parser", "run_serve", "main"]


def __getattr__(name):
    if name == "Server":
        from .app import Server

        return Server
    if name in ("add_serve_arguments", "build_parser", "run_serve", "main"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'mtpnb.server' has no attribute {name!r}")
