"""``python -m engine serve``: load the model once and serve the bot over a websocket."""

from __future__ import annotations

import argparse
import sys

from engine.cli import CliError, load_cli_config
from engine.contract.config import CONFIG_HELP

HELP = "serve the engine for the bot over a websocket (prints 'ARCAE_ENGINE_READY <url>' when ready)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--host", help="address to listen on (default: [engine] host)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default: [engine] port)")
    parser.add_argument(
        "--insecure-no-secret",
        action="store_true",
        help="accept clients without a shared secret (local development only)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from engine.contract.config import Secrets

    config = load_cli_config(args.config)
    secrets = Secrets.from_env(config)
    secret = secrets.engine_secret.get_secret_value() if secrets.engine_secret else None
    if secret is None and not args.insecure_no_secret:
        raise CliError(
            f"no engine secret: set the environment variable {config.engine.secret_env} "
            "(or pass --insecure-no-secret for local development)"
        )
    host = args.host or config.engine.host
    port = config.engine.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {port}")

    from engine.contract.errors import EngineError
    from engine.service.server import serve

    # stdout carries exactly one line, the ready line: anything a library prints goes to stderr.
    ready_stream = sys.stdout
    sys.stdout = sys.stderr
    try:
        return asyncio.run(serve(config, secrets, host=host, port=port, secret=secret, ready_stream=ready_stream))
    except EngineError as exc:  # e.g. the model is missing: one clear line, not a traceback
        raise CliError(exc.message) from None
    except OSError as exc:  # e.g. the port is taken
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        sys.stdout = ready_stream
