"""A local Discord protocol double: REST, gateway websocket and attachment CDN on 127.0.0.1.

It implements the part of Discord's API that discord.py 2.7 uses for a slash-command bot
(login, command sync, interaction callbacks, webhook follow-ups, channel messages,
reactions) and records every REST call, so tests can assert what a user would see. Tests
drive it like users do: ``invoke_slash``, ``click``, ``submit_modal``, ``react``.

The bot is pointed at it only through configuration (``discord.api_base`` and
``discord.gateway_url``); nothing in the bot knows it is talking to a double. It lives here,
not under tests/, because the benchmark's ``ack`` case runs on it (product code never imports tests).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

from engine.benchmarks.discord_rest import Call, DiscordRestRoutes

ADMIN_PERMISSIONS = str((1 << 41) - 1)
MEMBER_PERMISSIONS = str(0x400 | 0x800 | 0x8000 | 0x80000000)  # view, send, attach, use commands


@dataclass
class Interaction:
    """An interaction the double dispatched, and what the bot answered."""

    id: int
    token: str
    user: dict[str, Any]
    channel_id: int
    kind: int
    created: float = field(default_factory=time.monotonic)
    expired: bool = False
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original_id: int | None = None
    message_id: int | None = None  # the message whose component was pressed
    attachment_size_limit: int = 10 * 1024 * 1024


class DiscordDouble(DiscordRestRoutes):
    """Run with ``await double.start()``; ``api_base`` and ``gateway_url`` go into the bot config."""

    def __init__(self, *, attachment_size_limit: int = 10 * 1024 * 1024) -> None:
        self._ids = itertools.count(1_200_000_000_000_000_000)
        self.attachment_size_limit = attachment_size_limit
        self.app_id = self.snowflake()
        self.bot_user = self._user("arcae", bot=True, uid=self.app_id)
        self.guild_id = self.snowflake()
        self.guild_locale = "en-US"  # the home server's language (Server Settings > Community > Overview)
        self.admin_role = self.snowflake()
        self.artist_role = self.snowflake()
        self.owner = self._user("owner")
        self.alice = self._user("alice")
        self.bob = self._user("bob")
        self.admin = self._user("admin")
        self.roles = {self.owner["id"]: [], self.alice["id"]: [self.artist_role],
                      self.bob["id"]: [self.artist_role], self.admin["id"]: [self.admin_role]}
        self.channel = self._channel("general", nsfw=False)
        self.nsfw_channel = self._channel("after-dark", nsfw=True)
        self.gallery_channel = self._channel("gallery", nsfw=False)
        self.highlight_channel = self._channel("highlights", nsfw=False)
        # A second server the bot was invited to, owned by a stranger: not one of Arcae's home servers.
        # alice is a member of both.
        self.other_guild_id = self.snowflake()
        self.stranger = self._user("stranger")
        self.other_channel = self._channel("elsewhere", nsfw=False, guild_id=self.other_guild_id)
        self.channels = {c["id"]: c for c in (self.channel, self.nsfw_channel, self.gallery_channel,
                                              self.highlight_channel, self.other_channel)}
        # Synced commands by scope, as Discord keeps them: "global", or a guild id; each PUT replaces one scope.
        self.command_scopes: dict[str, dict[str, dict[str, Any]]] = {}
        self.calls: list[Call] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.deleted: set[int] = set()
        self.interactions: dict[str, Interaction] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.attachments: dict[int, bytes] = {}
        self.cdn_fetches: list[int] = []  # attachment ids the bot downloaded, in order
        # When set, attachment downloads wait for it (a large picture on a slow link).
        self.cdn_gate: asyncio.Event | None = None
        self.identifies = 0
        # Seconds before each REST answer: real Discord takes tens to hundreds of milliseconds, and
        # races between concurrent requests (check-then-insert after a defer) only show with it.
        self.latency_s = 0.0
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ identity helpers

    def snowflake(self) -> str:
        """A fresh, increasing snowflake id (as Discord sends them: a string)."""
        return str(next(self._ids))

    def _user(self, name: str, *, bot: bool = False, uid: str | None = None) -> dict[str, Any]:
        return {"id": uid or self.snowflake(), "username": name, "discriminator": "0",
                "global_name": name, "avatar": None, "bot": bot, "public_flags": 0}

    def _channel(self, name: str, *, nsfw: bool, guild_id: str | None = None) -> dict[str, Any]:
        return {"id": self.snowflake(), "type": 0, "guild_id": guild_id or self.guild_id, "name": name,
                "position": 0, "nsfw": nsfw, "topic": None, "parent_id": None,
                "permission_overwrites": [], "rate_limit_per_user": 0, "last_message_id": None}

    def _member(self, user: dict[str, Any], guild_id: str | None = None) -> dict[str, Any]:
        if guild_id is not None and guild_id != self.guild_id:  # the stranger's server: only he is an admin
            admin, roles = user["id"] == self.stranger["id"], []
        else:
            admin, roles = user["id"] in (self.owner["id"], self.admin["id"]), self.roles.get(user["id"], [])
        return {"user": user, "roles": roles, "flags": 0, "nick": None,
                "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False, "mute": False,
                "pending": False, "avatar": None,
                "permissions": ADMIN_PERMISSIONS if admin else MEMBER_PERMISSIONS}

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ server

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _touch(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until ``predicate()`` returns something truthy; return it (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            op = data.get("op")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11, "d": None}))
            elif op in (2, 6):  # identify, or resume (answered as a fresh session)
                await self._identify(ws)
        if self._ws is ws:
            self._ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse) -> None:
        self.identifies += 1
        self._seq = 0
        ready = {"v": 10, "user": self.bot_user, "session_id": f"session-{self.identifies}",
                 "resume_gateway_url": self.gateway_url, "guilds": [{"id": self.guild_id, "unavailable": True},
                                                                  {"id": self.other_guild_id, "unavailable": True}],
                 "application": {"id": self.app_id, "flags": 0}, "shard": [0, 1]}
        await self._send(ws, "READY", ready)
        await self._send(ws, "GUILD_CREATE", self._guild_payload())
        await self._send(ws, "GUILD_CREATE", self._other_guild_payload())
        self._touch()

    def _guild_payload(self) -> dict[str, Any]:
        roles = [{"id": self.guild_id, "name": "@everyone", "permissions": MEMBER_PERMISSIONS, "position": 0,
                  "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0},
                 {"id": self.admin_role, "name": "arcae-admin", "permissions": "0", "position": 1,
                  "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0},
                 {"id": self.artist_role, "name": "artist", "permissions": "0", "position": 2,
                  "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}]
        members = [self._member(u) for u in (self.owner, self.alice, self.bob, self.admin)]
        members.append({**self._member(self.bot_user), "permissions": ADMIN_PERMISSIONS})
        return {"id": self.guild_id, "name": "Arcae Test Server", "owner_id": self.owner["id"],
                "unavailable": False, "member_count": len(members), "large": False, "roles": roles,
                "emojis": [], "stickers": [], "features": [],
                "channels": [c for c in self.channels.values() if c["guild_id"] == self.guild_id],
                "threads": [], "members": members, "voice_states": [], "presences": [],
                "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
                "icon": None, "splash": None, "mfa_level": 0, "verification_level": 0,
                "explicit_content_filter": 0, "default_message_notifications": 0,
                "premium_tier": 0, "preferred_locale": self.guild_locale, "nsfw_level": 0,
                "joined_at": "2024-01-01T00:00:00+00:00", "system_channel_id": None}

    def _other_guild_payload(self) -> dict[str, Any]:
        """The stranger's server: he owns it; alice is a member."""
        gid = self.other_guild_id
        payload = self._guild_payload()
        members = [self._member(u, gid) for u in (self.stranger, self.alice)]
        members.append({**self._member(self.bot_user, gid), "permissions": ADMIN_PERMISSIONS})
        payload.update({"id": gid, "name": "Stranger's Server", "owner_id": self.stranger["id"],
                        "roles": [{**payload["roles"][0], "id": gid}], "members": members,
                        "member_count": len(members),
                        "channels": [c for c in self.channels.values() if c["guild_id"] == gid]})
        return payload

    async def _send(self, ws: web.WebSocketResponse, event: str, data: Any) -> None:
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def dispatch(self, event: str, data: Any) -> None:
        """Send one gateway event to the connected bot."""
        ws = await self.wait_for(lambda: self._ws, timeout=30)
        await self._send(ws, event, data)

    async def _dispatch_quietly(self, event: str, data: Any) -> None:
        """``dispatch`` from a REST handler: a bot that is gone by then simply misses the event."""
        try:
            await self.dispatch(event, data)
        except (AssertionError, ConnectionError, RuntimeError):
            pass

    # ------------------------------------------------------------------ user actions

    def _interaction_base(self, user: dict[str, Any], channel: dict[str, Any], kind: int) -> tuple[Interaction, dict]:
        iid = self.snowflake()
        token = f"itok-{iid}"
        record = Interaction(int(iid), token, user, int(channel["id"]), kind)
        self.interactions[token] = record
        gid = channel["guild_id"]
        payload = {"id": iid, "application_id": self.app_id, "type": kind, "token": token, "version": 1,
                   "guild_id": gid, "channel_id": channel["id"], "channel": channel,
                   "member": self._member(user, gid),
                   "guild_locale": self.guild_locale if gid == self.guild_id else "en-US",
                   # The user's Discord language: a test user may carry one ({**d.alice, "locale": "ja"}).
                   "locale": user.get("locale", "en-US"),
                   "app_permissions": ADMIN_PERMISSIONS, "entitlements": [],
                   "authorizing_integration_owners": {"0": gid}, "context": 0,
                   "attachment_size_limit": self.attachment_size_limit}
        return record, payload

    def _command(self, name: str) -> dict[str, Any]:
        """The synced command ``name`` as the home server sees it."""
        return self._resolve_command(name, self.guild_id)[0]

    def _resolve_command(self, name: str, guild_id: str, *,
                         anywhere: bool = False) -> tuple[dict[str, Any], str | None]:
        """The command a user in ``guild_id`` invokes, and the guild it is registered to (None: global).

        ``anywhere``: also a command registered only to another server, as a forged or stale invocation
        (Discord would not offer it there, but the bot must refuse it if it arrives anyway).
        """
        for scope in (guild_id, "global"):
            if name in self.command_scopes.get(scope, {}):
                return self.command_scopes[scope][name], (None if scope == "global" else scope)
        if name in self.commands and anywhere:
            cmd = self.commands[name]
            return cmd, cmd.get("guild_id")
        raise AssertionError(f"command {name!r} was never synced to server {guild_id} or globally; "
                             f"synced: {sorted(self.commands)}")

    def commands_in(self, scope: str) -> set[str]:
        """Names of the commands synced to ``scope`` ("global" or a guild id)."""
        return set(self.command_scopes.get(scope, {}))

    def _options(self, spec: list[dict], values: dict[str, Any], focused: str | None) -> list[dict]:
        by_name = {o["name"]: o for o in spec}
        out = []
        for name, value in values.items():
            if name not in by_name:
                raise AssertionError(f"unknown option {name!r}; options: {sorted(by_name)}")
            opt = {"name": name, "type": by_name[name]["type"], "value": value}
            if name == focused:
                opt["focused"] = True
            out.append(opt)
        return out

    async def invoke_slash(self, user: dict, channel: dict, command: str, options: dict[str, Any] | None = None,
                           *, focused: str | None = None, attachment_size_limit: int | None = None,
                           anywhere: bool = False, files: dict[str, tuple[str, bytes]] | None = None) -> Interaction:
        """Run ``/command`` (``"gallery top"`` for a subcommand); ``focused`` makes it an autocomplete.

        ``files`` maps attachment options to (filename, bytes): they go to the double's CDN and
        into the payload's ``resolved`` attachments, as Discord sends them.
        """
        root, _, sub = command.partition(" ")
        cmd, registered_to = self._resolve_command(root, channel["guild_id"], anywhere=anywhere)
        record, payload = self._interaction_base(user, channel, 4 if focused else 2)
        if attachment_size_limit is not None:
            payload["attachment_size_limit"] = record.attachment_size_limit = attachment_size_limit
        values, resolved = dict(options or {}), {}
        for option, (filename, data) in (files or {}).items():
            attachment = self.attach(filename, data)
            resolved[attachment["id"]] = attachment
            values[option] = attachment["id"]
        spec = cmd.get("options", [])
        if sub:
            sub_spec = next(o for o in spec if o["name"] == sub)
            opts = [{"name": sub, "type": 1, "options": self._options(sub_spec.get("options", []), values, focused)}]
        else:
            opts = self._options(spec, values, focused)
        payload["data"] = {"id": cmd["id"], "name": root, "type": 1, "options": opts}
        if resolved:
            payload["data"]["resolved"] = {"attachments": resolved}
        if registered_to is not None:  # Discord names the guild of a guild command, none for a global one
            payload["data"]["guild_id"] = registered_to
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    async def click(self, user: dict, message: dict, custom_id: str) -> Interaction:
        """Press the button ``custom_id`` on ``message`` (a message dict the double holds)."""
        channel = self.channels[str(message["channel_id"])]
        record, payload = self._interaction_base(user, channel, 3)
        payload["message"] = message
        record.message_id = int(message["id"])
        payload["data"] = {"custom_id": custom_id, "component_type": 2}
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    async def submit_modal(self, user: dict, channel: dict, custom_id: str, values: dict[str, str]) -> Interaction:
        """Submit the modal ``custom_id`` with text input values by their custom ids."""
        record, payload = self._interaction_base(user, channel, 5)
        rows = [{"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in values.items()]
        payload["data"] = {"custom_id": custom_id, "components": rows}
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    async def react(self, user: dict, message: dict, emoji: str, *, remove: bool = False) -> None:
        """Add (``remove``: take back) a unicode emoji reaction as ``user``."""
        guild_id = self.channels[str(message["channel_id"])]["guild_id"]
        data = {"user_id": user["id"], "channel_id": str(message["channel_id"]), "message_id": message["id"],
                "guild_id": guild_id, "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}
        if not remove:  # Discord sends the member with an add only
            data["member"] = self._member(user, guild_id)
        await self.dispatch("MESSAGE_REACTION_REMOVE" if remove else "MESSAGE_REACTION_ADD", data)

    async def clear_reactions(self, message: dict) -> None:
        """A moderator removes every reaction from ``message``."""
        await self.dispatch("MESSAGE_REACTION_REMOVE_ALL", {
            "channel_id": str(message["channel_id"]), "message_id": message["id"],
            "guild_id": self.channels[str(message["channel_id"])]["guild_id"]})

    async def set_guild_locale(self, locale: str) -> None:
        """An admin changes the home server's language: Discord sends GUILD_UPDATE with it."""
        self.guild_locale = locale
        await self.dispatch("GUILD_UPDATE", self._guild_payload())

    def expire(self, interaction: Interaction) -> None:
        """Make the interaction's token invalid, as Discord does after 15 minutes."""
        interaction.expired = True

    # ------------------------------------------------------------------ queries for tests

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    def channel_messages(self, channel: dict) -> list[dict]:
        return [m for m in self.messages.values()
                if m["channel_id"] == channel["id"] and int(m["id"]) not in self.deleted]

    def original(self, interaction: Interaction) -> dict | None:
        if interaction.original_id is None:
            return None
        return self.messages.get(interaction.original_id)

    def followups(self, interaction: Interaction) -> list[dict]:
        return [m for m in self.messages.values() if m.get("_interaction") == interaction.token
                and int(m["id"]) != interaction.original_id and int(m["id"]) not in self.deleted]
