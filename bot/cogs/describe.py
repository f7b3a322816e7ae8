"""/describe: the WD tagger's reading of a user's picture as a ready prompt, with buttons to imagine from it.

The tagger is the one training captions with (``training.data.tagger``, loaded once by the
bot's ``TrainingFlow``), run in a worker thread so the event loop never waits on onnxruntime.
The prompt is the character tags first, then the general tags by confidence, escaped for
prompt syntax (``hikari \\(arcaea\\)``). In a channel that is not age-restricted a picture the
tagger rates as one of ``[content] flagged_ratings`` gets its rating only, and tags that
``[content] blocked_tags`` names are never shown. A PNG that carries generation parameters
(A1111's ``parameters`` text or Arcae's own request) also gets "Remix with these parameters".
The answer is private to the asker; its buttons last 15 minutes (Discord's edit window).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.actions import _parse_number as parse_number
from bot.actions import params_for_channel, start_job
from bot.errors import Refused, UserFacingError
from bot.i18n import _, interaction_language, tr
from bot.policy import blocked_tags_in, channel_is_nsfw, check_access, check_ranges, content_rules
from bot.replies import reply, report_error
from bot.training_flow import flow_for
from bot.uploads import Picture, read_picture
from bot.views import RemixModal
from engine.contract import protocol
from engine.contract.config import ArcaeConfig

if TYPE_CHECKING:
    from bot.app import ArcaeBot

log = logging.getLogger(__name__)
VIEW_TIMEOUT_S = 15 * 60


def describe_prompt(result: Any, config: ArcaeConfig, *, sfw: bool) -> tuple[str, int]:
    """(prompt, how many tags were left out): characters first, then general tags by confidence."""
    from training.data.captions import escape_tag

    tags = [name for name, _ in result.character] + [name for name, _ in result.general]
    shown = [t for t in tags if not (sfw and blocked_tags_in(t, config))]
    return ", ".join(escape_tag(t) for t in shown), len(tags) - len(shown)


def parameters_text(parameters: dict[str, str]) -> str:
    """A PNG's parameters in a few lines, for the embed."""
    lines = [embeds.truncate(parameters.get("Prompt", ""), 600)]
    if parameters.get("Negative prompt"):
        lines.append(f"Negative: {embeds.truncate(parameters['Negative prompt'], 200)}")
    keys = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
    rest = ", ".join(f"{k}: {parameters[k]}" for k in keys if k in parameters)
    return "\n".join(lines + ([rest] if rest else []))


async def start_from_values(interaction: discord.Interaction, values: dict[str, str]) -> None:
    """A submitted modal (prompt, negative, seed, steps, cfg): a new job in this channel, under its rules."""
    bot = cast("ArcaeBot", interaction.client)
    try:
        seed = cast("int | None", parse_number(values["seed"], "seed", int))
        steps = cast("int | None", parse_number(values["steps"], "steps", int))
        cfg = parse_number(values["cfg"], "cfg", float)
        prompt = values["prompt"].strip()
        negative = values["negative"].strip() or None
        check_ranges(bot.config, prompt=prompt, steps=steps, cfg=cfg, count=1, seed=seed, weights={},
                     negative=negative)
        check_access(interaction, bot.config)
        params = protocol.GenerationParams(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, cfg=cfg)
        await start_job(interaction, params=params_for_channel(interaction, params))
    except UserFacingError as exc:
        await report_error(interaction, exc)


class DescribeView(discord.ui.View):
    """"Imagine this" (the tags as a prompt) and, for a PNG with parameters, "Remix with these parameters"."""

    def __init__(self, prompt: str, parameters: dict[str, str] | None, language: str | None = None) -> None:
        super().__init__(timeout=VIEW_TIMEOUT_S)
        self.prompt = prompt
        self.parameters = parameters
        nonce = secrets.token_hex(6)
        if prompt:
            self.add_item(self._button(_("Imagine this").render(language), "🎨", f"arcae-describe:imagine:{nonce}", self._imagine))
        if parameters:
            self.add_item(self._button(_("Remix with these parameters").render(language), "🔁", f"arcae-describe:remix:{nonce}",
                                       self._remix))

    @staticmethod
    def _button(label: str, emoji: str, custom_id: str, callback: Any) -> discord.ui.Button[Any]:
        item: discord.ui.Button[Any] = discord.ui.Button(label=label, emoji=emoji, custom_id=custom_id,
                                                         style=discord.ButtonStyle.primary)
        item.callback = callback  # type: ignore[method-assign]
        return item

    async def _open(self, interaction: discord.Interaction, **fields: str) -> None:
        async def submit(inter: discord.Interaction, _: str, values: dict[str, str]) -> None:
            await start_from_values(inter, values)

        await interaction.response.send_modal(RemixModal(
            f"describe-{secrets.token_hex(4)}", submit=submit, prompt=fields.get("prompt", ""),
            negative=fields.get("negative", ""), seed=fields.get("seed", ""), steps=fields.get("steps", ""),
            cfg=fields.get("cfg", "")))

    async def _imagine(self, interaction: discord.Interaction) -> None:
        await self._open(interaction, prompt=self.prompt)

    async def _remix(self, interaction: discord.Interaction) -> None:
        p = self.parameters or {}
        await self._open(interaction, prompt=p.get("Prompt", ""), negative=p.get("Negative prompt", ""),
                         seed=p.get("Seed", ""), steps=p.get("Steps", ""), cfg=p.get("CFG scale", ""))


class Describe(commands.Cog):
    """The /describe command."""

    def __init__(self, bot: "ArcaeBot") -> None:
        self.bot = bot

    @app_commands.command(name="describe", description="Tags for a picture (WD tagger) as a ready prompt")
    @app_commands.guild_only()
    @app_commands.describe(image="A PNG, JPEG, WebP, GIF or BMP picture")
    async def describe(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        config = self.bot.config
        check_access(interaction, config)
        # Download, checks and the tagger can take longer than Discord's 3 s.
        await interaction.response.defer(ephemeral=True, thinking=True)
        picture = await read_picture(image, config)
        tagger = await self._tagger()
        result = (await asyncio.to_thread(tagger.predict, [picture.image]))[0]
        rules = content_rules(channel_is_nsfw(interaction.channel), config)
        rating = f"{result.rating} ({result.ratings.get(result.rating, 0.0):.2f})"
        if rules.sfw and result.rating in rules.flagged:
            await reply(interaction, tr(interaction, "The WD tagger rates this picture **%(rating)s**. This channel "
                                                  "is not age-restricted, so its tags are not shown here; use "
                                                  "/describe in an age-restricted channel.", rating=rating))
            return
        prompt, hidden = describe_prompt(result, config, sfw=rules.sfw)
        parameters = self._shown_parameters(picture, rules.sfw)
        embed = self._embed(prompt, rating, hidden, picture, parameters)
        view = DescribeView(prompt, parameters, interaction_language(interaction))
        await interaction.followup.send(embed=embed, view=view, ephemeral=True, wait=True)

    async def _tagger(self) -> Any:
        try:
            return await flow_for(self.bot).tagger()
        except Exception as exc:  # a missing or broken model: say which, keep the bot up
            log.warning("the WD tagger could not be loaded: %s", exc)
            raise Refused(_("/describe is unavailable: the WD tagger `%(model)s` could not be loaded. Please tell "
                            "an admin ([tagger] model in config.toml).", model=self.bot.config.tagger.model)) from None

    def _shown_parameters(self, picture: Picture, sfw: bool) -> dict[str, str] | None:
        """The PNG's parameters, unless this channel's rules would refuse its prompt."""
        p = picture.parameters
        if not p or (sfw and blocked_tags_in(p.get("Prompt", ""), self.bot.config)):
            return None
        return p

    @staticmethod
    def _embed(prompt: str, rating: str, hidden: int, picture: Picture,
               parameters: dict[str, str] | None) -> discord.Embed:
        shown = embeds.truncate(prompt, 3500) or "(no tags above the thresholds)"
        embed = discord.Embed(title=f"Describe · {embeds.truncate(picture.filename, 200)}", colour=embeds.COLOR,
                              description=f"```\n{shown}\n```")
        embed.add_field(name="Rating", value=rating)
        if hidden:
            embed.add_field(name="Left out", value=f"{hidden} tag(s) not allowed in this channel")
        if parameters:
            embed.add_field(name="Parameters in this PNG", value=embeds.truncate(parameters_text(parameters),
                                                                                  embeds.FIELD_LIMIT), inline=False)
        embed.set_footer(text="Character tags first, then general tags by confidence. Paste into /imagine, "
                              "or press a button.")
        return embed


async def setup(bot: "ArcaeBot") -> None:
    await bot.add_cog(Describe(bot))
