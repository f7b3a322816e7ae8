"""``python -m engine worker --redis URL``: one GPU's worker in scale-out mode.

Loads the model once, connects OUT to Redis (nothing listens here, so a GPU behind a home
router works), and serves the jobs the bot's dispatcher sends it. The Redis password comes
from the environment variable named by ``[engine] redis_password_env``, never the command
line. Prints ``ARCAE_WORKER_READY <name>`` on stdout once registered. SIGTERM/SIGINT: stop
taking jobs, unregister; the dispatcher re-dispatches whatever this worker still held.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import CliError, load_cli_config
from engine.contract.config import CONFIG_HELP

HELP = "serve jobs from Redis as one scale-out GPU worker (prints 'ARCAE_WORKER_READY <name>' when ready)"
READY_PREFIX = "ARCAE_WORKER_READY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", help="Redis URL, e.g. redis://gpu-hub.example:6379/0 "
                        "(default: [engine] redis_url); no credentials in it: the password comes from the environment")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--name", help="this worker's name (default: [engine] worker_name, else HOSTNAME-PID)")
    parser.add_argument("--capacity", type=int, choices=(1, 2), help="jobs held at once (default: [engine] worker_capacity)")
    parser.add_argument("--prefix", default="arcae", help="Redis key prefix shared with the bot (default: arcae)")
    training = parser.add_mutually_exclusive_group()
    training.add_argument("--training", dest="training", action="store_true", default=None,
                          help="accept training runs (default: [engine] accepts_training)")
    training.add_argument("--no-training", dest="training", action="store_false", help="refuse training runs")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import re
    import socket

    from engine.contract.config import Secrets
    from engine.scaleout.redis_keys import RedisConfigError, check_redis_url

    config = load_cli_config(args.config)
    secrets = Secrets.from_env(config)
    password = secrets.redis_password.get_secret_value() if secrets.redis_password else None
    url = args.redis or config.engine.redis_url
    try:
        where = check_redis_url(url, password, config.engine.redis_password_env)
    except RedisConfigError as exc:
        raise CliError(str(exc)) from None
    name = args.name or config.engine.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", name):
        raise CliError(f"worker name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (at most 64)")
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", args.prefix):
        raise CliError("--prefix: use letters, digits, '_' and '-' (at most 32)")
    options = {
        "name": name,
        "capacity": args.capacity or config.engine.worker_capacity,
        "accepts_training": config.engine.accepts_training if args.training is None else args.training,
        "prefix": args.prefix,
    }

    from engine.contract.errors import EngineError

    # stdout carries exactly one line, the ready line: anything a library prints goes to stderr.
    ready_stream = sys.stdout
    sys.stdout = sys.stderr
    try:
        return asyncio.run(_serve(config, secrets, url, password, where, options, ready_stream))
    except EngineError as exc:  # e.g. the model is missing: one clear line, not a traceback
        raise CliError(exc.message) from None
    finally:
        sys.stdout = ready_stream


async def _serve(config, secrets, url, password, where, options, ready_stream) -> int:  # noqa: ANN001
    import asyncio
    import logging
    import signal

    from engine.scaleout.redis_keys import RedisKeys, make_client
    from engine.scaleout.redis_worker import BLOCK_MS, RedisWorker
    from engine.service.server import build_worker
    from engine.service.training_hook import training_factory

    log = logging.getLogger("engine.service.gpu_worker")
    client = make_client(url, password, block_ms=BLOCK_MS)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise CliError(f"cannot reach Redis at {where}: {_describe(exc)}") from None
    gpu = await asyncio.to_thread(build_worker, config, secrets)
    if options["accepts_training"]:
        gpu.train_factory = training_factory(config, gpu.generator)
    worker = RedisWorker(
        client, gpu, name=options["name"], keys=RedisKeys(options["prefix"]), capacity=options["capacity"],
        lease_ttl_s=config.engine.lease_ttl_s, accepts_training=options["accepts_training"],
        loaded_adapters=lambda: list(getattr(gpu.generator.registry, "loaded", [])),
        gpu=_gpu_name(str(gpu.describe().get("device", ""))),
        outputs_dir=config.path(config.storage.outputs_dir),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    runner = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        ready.cancel()
        await client.aclose()
        runner.result()  # raises what went wrong
        return 1
    info = worker.info()
    log.info("worker %s ready: %s on %s, Redis %s", worker.name, info.model, info.gpu or info.device, where)
    ready_stream.write(f"{READY_PREFIX} {worker.name}\n")
    ready_stream.flush()
    await runner
    await client.aclose()
    log.info("worker %s stopped", worker.name)
    return 0


def _gpu_name(device: str) -> str:
    """The GPU's marketing name for /status (e.g. "NVIDIA GeForce RTX 4090"), or the device."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return device


def _describe(exc: BaseException) -> str:
    # redis-py messages never contain the password; keep them short anyway.
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
