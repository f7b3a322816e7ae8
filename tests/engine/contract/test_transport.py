"""Both ways of reaching the engine offer the bot the same interface (``EngineTransport``)."""

from __future__ import annotations

import inspect

from bot.engine_link import EngineLink
from engine.contract.config import load_config
from engine.contract.transport import EngineTransport
from engine.scaleout.dispatcher import Dispatcher
from tests.conftest import write_config


async def _ignore(event) -> None:
    return None


def _methods(cls: type) -> dict[str, list[str]]:
    """Public coroutine methods of the interface and their parameter names (minus self)."""
    return {name: list(inspect.signature(fn).parameters)[1:] for name, fn in inspect.getmembers(cls)
            if inspect.iscoroutinefunction(fn) and not name.startswith("_")}


def test_websocket_link_and_redis_dispatcher_both_implement_the_transport(tmp_path):
    config = load_config(write_config(tmp_path, tmp_path / "model"))
    link = EngineLink("ws://127.0.0.1:1/ws", "secret", on_event=_ignore)
    dispatcher = Dispatcher(config, on_event=_ignore)
    for transport in (link, dispatcher):
        assert isinstance(transport, EngineTransport), type(transport).__name__
        assert transport.connected is False
        implemented = _methods(type(transport))
        for name, params in _methods(EngineTransport).items():
            # Same required parameter names; an implementation may add optional ones (start's timeout).
            required = [p for p, v in inspect.signature(getattr(type(transport), name)).parameters.items()
                        if p != "self" and v.default is inspect.Parameter.empty]
            assert required == params, (type(transport).__name__, name, implemented.get(name))
