"""The REST side of the local Discord double: message, interaction-callback, webhook, command and CDN routes.

``DiscordRestRoutes`` is mixed into ``engine.benchmarks.discord_double.DiscordDouble``, which holds
the state these routes read and write (messages, interactions, commands, attachments) and the
gateway. Every request is recorded as a ``Call`` so tests can assert what the bot sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from engine.benchmarks.discord_double import Interaction


def _json(data: Any, status: int = 200) -> web.Response:
    """discord.py parses a body as JSON only when the content type is exactly application/json."""
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


@dataclass
class Call:
    """One REST request the bot made."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[tuple[str, bytes]]
    at: float


class DiscordRestRoutes:
    """Discord's REST API as the double serves it (state lives on the DiscordDouble)."""

    # ------------------------------------------------------------------ REST

    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
        files: list[tuple[str, bytes]] = []
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            reader = await request.multipart()
            async for part in reader:
                data = await part.read()
                if part.name == "payload_json":
                    payload = json.loads(data)
                else:
                    files.append((part.filename or part.name or "file", bytes(data)))
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), files

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await self._read_body(request)
        self.calls.append(Call(request.method, path, dict(request.query), body, files, time.monotonic()))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        try:
            return await self._route(request.method, path.split("/")[1:], body, files, request)
        finally:
            self._touch()

    async def _route(self, method: str, p: list[str], body: Any, files: list, request: web.Request) -> web.StreamResponse:
        ok = _json
        if p == ["users", "@me"]:
            if request.headers.get("Authorization", "") != f"Bot {self.token}":
                return ok({"message": "401: Unauthorized", "code": 0}, status=401)
            return ok(self.bot_user)
        if p[0] == "users" and len(p) == 2:
            user = next((u for u in (self.owner, self.alice, self.bob, self.admin, self.stranger) if u["id"] == p[1]),
                        None)
            return ok(user) if user else ok({"message": "Unknown User", "code": 10013}, status=404)
        if p == ["oauth2", "applications", "@me"]:
            return ok({"id": self.app_id, "name": "Arcae", "description": "", "icon": None, "bot_public": True,
                       "bot_require_code_grant": False, "owner": self.owner, "verify_key": "00", "flags": 0,
                       "team": None, "summary": "", "rpc_origins": [], "interactions_endpoint_url": None})
        if p[0] == "gateway":
            return ok({"url": self.gateway_url, "shards": 1,
                       "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})
        if p[0] == "applications" and p[-1] == "commands":
            scope = p[3] if len(p) == 5 and p[2] == "guilds" else "global"
            return self._commands_route(method, body, scope)
        if p[0] == "interactions":
            return self._callback(p[1], p[2], body, files)
        if p[0] == "webhooks":
            return self._webhook(method, p[2], p[3:], body, files)
        if p[0] == "channels":
            return self._channel_route(method, p[1], p[2:], body, files)
        return ok({"message": f"the Discord double has no route {method} /{'/'.join(p)}", "code": 0}, status=404)

    token = "test-token"

    def _commands_route(self, method: str, body: Any, scope: str = "global") -> web.Response:
        """Bulk overwrite (PUT) or list the commands of one scope; ``commands`` keeps every scope's, by name."""
        if method == "PUT":
            out, replaced = [], {}
            for cmd in body or []:
                old = self.command_scopes.get(scope, {}).get(cmd["name"], {})
                stored = {**cmd, "id": old.get("id") or self.snowflake(), "application_id": self.app_id,
                          "version": "1"}
                if scope != "global":
                    stored["guild_id"] = scope
                replaced[cmd["name"]] = stored
                self.commands[cmd["name"]] = stored
                out.append(stored)
            self.command_scopes[scope] = replaced
            return _json(out)
        return _json(list(self.command_scopes.get(scope, {}).values()))

    def _new_message(self, channel_id: str, body: dict, files: list, *, interaction: Interaction | None = None) -> dict:
        mid = self.snowflake()
        guild_id = self.channels[channel_id]["guild_id"] if channel_id in self.channels else self.guild_id
        msg = {"id": mid, "channel_id": channel_id, "guild_id": guild_id, "type": 0 if interaction is None else 20,
               "author": self.bot_user, "content": "", "embeds": [], "components": [], "attachments": [],
               "mentions": [], "mention_roles": [], "mention_everyone": False, "pinned": False, "tts": False,
               "timestamp": "2024-01-01T00:00:00+00:00", "edited_timestamp": None, "flags": 0,
               "webhook_id": self.app_id if interaction else None, "application_id": self.app_id}
        if interaction is not None:
            msg["_interaction"] = interaction.token
        self._apply(msg, body or {}, files)
        self.messages[int(mid)] = msg
        return msg

    def _apply(self, msg: dict, body: dict, files: list) -> None:
        for key in ("content", "embeds", "components", "flags"):
            if key in body and body[key] is not None:
                msg[key] = body[key]
        if "attachments" in body or files:
            keep_ids = {str(a.get("id")) for a in body.get("attachments") or []}
            kept = [a for a in msg["attachments"] if a["id"] in keep_ids]
            kept += [self.attach(name, data) for name, data in files]
            msg["attachments"] = kept
        msg["_edits"] = msg.get("_edits", -1) + 1
        if msg["_edits"]:
            msg["edited_timestamp"] = "2024-01-01T00:00:01+00:00"

    def attach(self, filename: str, data: bytes) -> dict:
        """Put ``data`` on the double's CDN; the attachment object Discord would send for it."""
        aid = self.snowflake()
        self.attachments[int(aid)] = data
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{filename}"
        suffix = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        content_type = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
                        "txt": "text/plain", "zip": "application/zip"}.get(suffix, "application/octet-stream")
        return {"id": aid, "filename": filename, "size": len(data), "url": url, "proxy_url": url,
                "content_type": content_type}

    def public(self, msg: dict) -> dict:
        """A message payload without the double's private bookkeeping keys."""
        return {k: v for k, v in msg.items() if not k.startswith("_")}

    def _callback(self, iid: str, token: str, body: dict, files: list) -> web.Response:
        record = self.interactions.get(token)
        if record is None or str(record.id) != iid:
            return _json({"message": "Unknown interaction", "code": 10062}, status=404)
        if record.callbacks:
            return _json({"message": "Interaction has already been acknowledged.", "code": 40060}, status=400)
        record.callbacks.append(body)
        kind = body["type"]
        data = body.get("data") or {}
        result: dict[str, Any] = {"interaction": {"id": iid, "type": record.kind,
                                                  "response_message_loading": kind == 5,
                                                  "response_message_ephemeral": bool(data.get("flags", 0) & 64)}}
        if kind in (4, 5):
            msg = self._new_message(str(record.channel_id), data if kind == 4 else {"flags": data.get("flags", 0) | 128},
                                    files, interaction=record)
            record.original_id = int(msg["id"])
            result["interaction"]["response_message_id"] = msg["id"]
            result["resource"] = {"type": kind, "message": self.public(msg)}
        elif kind == 7:  # update the message whose component was pressed
            msg = self.messages.get(record.message_id) if record.message_id is not None else None
            if msg is not None:
                self._apply(msg, data, files)
            result["resource"] = {"type": kind, **({"message": self.public(msg)} if msg is not None else {})}
        else:
            result["resource"] = {"type": kind}
        return _json(result)

    def _webhook(self, method: str, token: str, rest: list[str], body: dict, files: list) -> web.Response:
        record = self.interactions.get(token)
        if record is None or record.expired:
            return _json({"message": "Invalid Webhook Token", "code": 50027}, status=401)
        if any(len(data) > record.attachment_size_limit for _, data in files):
            return _json({"message": "Request entity too large", "code": 40005}, status=413)
        if not rest:  # follow-up
            msg = self._new_message(str(record.channel_id), body, files, interaction=record)
            return _json(self.public(msg))
        target = record.original_id if rest[1] == "@original" else int(rest[1])
        msg = self.messages.get(target) if target is not None else None
        if msg is None or target in self.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        if method == "PATCH":
            if msg["flags"] & 128:
                msg["flags"] &= ~128
            self._apply(msg, body or {}, files)
        elif method == "DELETE":
            self.deleted.add(target)
            return web.Response(status=204)
        return _json(self.public(msg))

    def _channel_route(self, method: str, cid: str, rest: list[str], body: Any, files: list) -> web.Response:
        if cid not in self.channels:
            return _json({"message": "Unknown Channel", "code": 10003}, status=404)
        if not rest:
            return _json(self.channels[cid])
        if rest == ["messages"] and method == "POST":
            return _json(self.public(self._new_message(cid, body, files)))
        if rest[:2] == ["messages", "pins"] and len(rest) == 3:  # PUT pins, DELETE unpins
            pinned = self.messages.get(int(rest[2]))
            if pinned is None or int(rest[2]) in self.deleted or pinned["channel_id"] != cid:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            pinned["pinned"] = method == "PUT"
            return web.Response(status=204)
        msg = self.messages.get(int(rest[1])) if len(rest) > 1 else None
        if msg is None or int(rest[1]) in self.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        if len(rest) > 2 and rest[2] == "reactions":
            return web.Response(status=204)
        if method == "PATCH":
            self._apply(msg, body or {}, files)
        elif method == "DELETE":
            self.deleted.add(int(rest[1]))
            # Discord tells the bot's gateway too (as it does for a message deleted by anyone).
            task = asyncio.get_running_loop().create_task(self._dispatch_quietly("MESSAGE_DELETE", {
                "id": rest[1], "channel_id": cid, "guild_id": self.channels[cid]["guild_id"]}))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return web.Response(status=204)
        return _json(self.public(msg))

    async def _cdn(self, request: web.Request) -> web.Response:
        self.cdn_fetches.append(int(request.match_info["aid"]))
        if self.cdn_gate is not None:
            await self.cdn_gate.wait()
        data = self.attachments.get(int(request.match_info["aid"]))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")
