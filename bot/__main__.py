"""``python -m bot [--config FILE]``: run the Arcae Discord bot.

The token comes from the environment variable named by ``[discord] token_env``
(default ARCAE_DISCORD_TOKEN). Without one, or with one Discord refuses, the bot exits
with status 2 and says exactly what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import discord
import yarl
from discord.gateway import DiscordWebSocket

from bot.errors import StartupError
from engine.contract.config import CONFIG_HELP, ArcaeConfig, ConfigError, Secrets, load_command_config, locate_config

TOKEN_HELP = (
    "set {env} to your bot's token: Discord Developer Portal (https://discord.com/developers/applications)"
    " > your application > Bot > Reset Token, then copy it, e.g. `export {env}=...` (never put it in"
    " config.toml)"
)


def point_at_discord(config: ArcaeConfig) -> None:
    """Use a REST proxy and/or gateway proxy when configured (empty = Discord itself)."""
    if config.discord.api_base:
        discord.http.Route.BASE = config.discord.api_base.rstrip("/")
    if config.discord.gateway_url:
        # A non-sharded client dials DEFAULT_GATEWAY directly instead of asking GET /gateway.
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.discord.gateway_url)


async def _run(config: ArcaeConfig, secrets: Secrets, config_path: Path | None, token: str) -> None:
    from bot.app import ArcaeBot

    bot = ArcaeBot(config, secrets, config_path)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        if not stopping.is_set():
            stopping.set()
            asyncio.ensure_future(bot.close())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    async with bot:
        await bot.start(token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="Run the Arcae Discord bot.")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("discord").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        config = load_command_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    secrets = Secrets.from_env(config)
    env = config.discord.token_env
    if secrets.discord_token is None:
        print(f"error: no Discord bot token: {TOKEN_HELP.format(env=env)}", file=sys.stderr)
        return 2
    point_at_discord(config)
    try:
        asyncio.run(_run(config, secrets, locate_config(args.config), secrets.discord_token.get_secret_value()))
    except discord.LoginFailure:
        print(f"error: Discord refused the token in {env} (401 Unauthorized: wrong, revoked or reset): "
              f"{TOKEN_HELP.format(env=env)}", file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired:
        print("error: Discord says a privileged intent is required; Arcae needs none, so check the code "
              "for a changed intent", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
