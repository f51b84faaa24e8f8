"""`mtpnb serve` / `python -m mtpnb.server`: the command line of the server.

The mtpnb CLI mounts it as a verb:

    serve = subparsers.add_parser("serve", help="...")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)      # run_serve(args) -> exit code
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..params import MAX_DEPTH, MODEL_ARGUMENTS, GenerationParams, add_arguments, model_options

DESCRIPTION = ("Serve a model over OpenAI- and Anthropic-compatible HTTP APIs (/v1/chat/completions, "
               "/v1/completions, /v1/messages, /v1/models, /health, /metrics), tool calls included, with "
               "per-token MTP events in extension fields.")
KEY_ENV = "MTPNB_API_KEY"


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a model folder or Hugging Face repo id (default: the embedded default model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs an API key)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY",
                     help=f"require 'Authorization: Bearer KEY' (visible in the process list: prefer "
                          f"--api-key-file or ${KEY_ENV})")
    key.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (first line)")
    parser.add_argument("--model-name", metavar="NAME", help="the model id clients use (default: the model's name)")
    parser.add_argument("--depth", type=int, default=None, metavar="D",
                        help=f"default drafts per verify, 0..{MAX_DEPTH} (default {GenerationParams.depth}; a request's "
                        "mtp_depth overrides)")
    parser.add_argument("--reasoning", choices=("on", "off"), default=None,
                        help="default thinking switch for chat templates that have one (default: the template's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature for requests that give none (default 0: greedy)")
    parser.add_argument("--max-tokens-limit", type=positive, default=4096, metavar="N",
                        help="largest max_tokens a request may ask for, and the default (default 4096)")
    parser.add_argument("--max-prompt-tokens", type=positive, default=None, metavar="N",
                        help="longest prompt in tokens, >= 1 (default: the model's max_position_embeddings)")
    parser.add_argument("--prompt-cache-mb", type=int, default=1024, metavar="MB",
                        help="memory for the states of earlier requests that later ones extend (multi-turn "
                             "prefix reuse, shared by all requests; least recently used go first); 0 turns it "
                             "off (default 1024)")
    parser.add_argument("--max-body-bytes", type=positive, default=1 << 20, metavar="N",
                        help="largest request body (default 1 MiB)")
    parser.add_argument("--max-queue", type=positive, default=64, metavar="N",
                        help="requests that may wait for the model before new ones get 503 (default 64)")
    parser.add_argument("--max-connections", type=positive, default=128, metavar="N",
                        help="open connections at once, and the listen backlog; past it: 503 (default 128)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header names NAME (repeatable; loopback names "
                             "always; without it a server on 127.0.0.1 refuses other names: DNS rebinding)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages at ORIGIN (https://app.example.com, or *) call the API from a "
                             "browser (repeatable; default: requests from web pages are refused)")
    add_arguments(parser, MODEL_ARGUMENTS)
    parser.add_argument("--quiet", action="store_true", help="log warnings only, not every request")
    return parser


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, not {port}")
    return port


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(prog="mtpnb serve", description=DESCRIPTION))


def _fail(message: str, code: int) -> int:
    print(f"mtpnb serve: {message}", file=sys.stderr, flush=True)
    return code


def read_api_key(args) -> str | None:
    """--api-key, --api-key-file or $MTPNB_API_KEY; raises ValueError with a one-line message."""
    if getattr(args, "api_key_file", None):
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {args.api_key_file}: {e.strerror or e}") from None
        if not key:
            raise ValueError(f"the API key file {args.api_key_file} is empty")
        if not key.isascii():
            raise ValueError(f"the API key in {args.api_key_file} has non-ASCII characters, which an HTTP header "
                             "cannot carry: use ASCII letters, digits and punctuation")
        return key
    key = args.api_key if getattr(args, "api_key", None) is not None else os.environ.get(KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError("the API key is empty")
    key = key.strip() if key else None
    if key is not None and not key.isascii():  # a header carries ASCII: such a key could never match
        raise ValueError("the API key has non-ASCII characters, which an HTTP header cannot carry: "
                         "use ASCII letters, digits and punctuation")
    return key


def run_serve(args) -> int:
    """Run the server until interrupted; the exit code (2: refused to start, 1: failed to start)."""
    from .app import is_loopback, refusal

    try:
        key = read_api_key(args)
    except ValueError as e:
        return _fail(str(e), 2)
    if not key and not is_loopback(args.host):
        return _fail(refusal(args.host), 2)
    if not is_loopback(args.host):
        print("mtpnb serve: note: plain HTTP: the key and the text cross the network unencrypted; put a TLS "
              "proxy in front, or reach it through an SSH tunnel", file=sys.stderr, flush=True)
    if getattr(args, "api_key", None) is not None:
        print("mtpnb serve: note: a key given with --api-key shows in the process list; "
              f"--api-key-file or ${KEY_ENV} keep it private", file=sys.stderr, flush=True)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from ..errors import MTPNBError
    from .app import Server

    load_options = {**model_options(args), "quiet": True}  # the start-up line below says when there is no head
    try:
        server = Server(
            args.model, host=args.host, port=args.port, api_key=key, model_name=args.model_name, depth=args.depth,
            reasoning=None if args.reasoning is None else args.reasoning == "on", temperature=args.temperature,
            max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
            max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_connections=args.max_connections,
            load_options=load_options, allowed_hosts=tuple(args.allowed_host), cors_origins=tuple(args.cors_origin),
            prompt_cache_mb=args.prompt_cache_mb,
        )
        server.bind()
    except MTPNBError as e:
        return _fail(str(e), 2)  # bad input: a missing model, a busy port
    model = server.model
    mtp = f"MTP head, depth {server.defaults['depth']}" if model.has_mtp else "no MTP head: plain decoding"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mtpnb serve: model {server.model_name} ({mtp})", flush=True)
    print(f"mtpnb serve: listening on http://{host}:{server.port}/v1 "
          f"({'API key required' if key else 'no API key: loopback only'})", flush=True)
    received = []

    def stop(signum, frame):
        # The first SIGINT or SIGTERM stops serving; the shutdown that follows (bounded, see
        # Server.close) is not interrupted by another one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()  # closes the server when it ends
    except KeyboardInterrupt:
        pass
    print(f"mtpnb serve: stopped ({received[0] if received else 'interrupted'})", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    return run_serve(build_parser().parse_args(argv))
