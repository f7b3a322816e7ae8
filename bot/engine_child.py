r"""What the engine child inherits from the bot, and how its output is read back.

Torch-free, standard library only. The child gets an allow-list of the bot's environment (what
Python, torch, CUDA and the hub need), never the Discord token or the Redis password. Its output
is read in chunks and split on ``\n`` and ``\r``: ``StreamReader.readline`` raises on a line over
64 KiB, and progress bars write ``\r`` without newlines.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re

from engine.contract.config import ArcaeConfig

MAX_LOG_LINE_BYTES = 8192  # a longer run of child output without a line break is logged in pieces
# What the engine child may inherit from the bot: what Python, torch, CUDA and the hub need.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM",
    "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "ARCAE_CONFIG",
})
CHILD_ENV_PREFIXES = (
    "LC_", "XDG_", "PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
    "CUDA", "CUBLAS_", "CUDNN_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "ORT_",
)


def child_env(config: ArcaeConfig) -> dict[str, str]:
    """The bot's environment, reduced to what the engine needs (an allow-list, not a deny-list).

    The Discord token and the Redis password are removed even if a prefix would admit them; the
    hub token (``[model] hub_token_env``) stays: the engine downloads the model.
    """
    keep = {config.model.hub_token_env}
    drop = {config.discord.token_env, config.engine.redis_password_env}
    return {
        name: value for name, value in os.environ.items()
        if name not in drop and (name in CHILD_ENV_NAMES or name in keep or name.startswith(CHILD_ENV_PREFIXES))
    }


class LineReader:
    r"""Lines of a child's output, read in chunks and split on ``\n`` and ``\r``.

    ``StreamReader.readline`` raises on a line over 64 KiB, and progress bars write ``\r``
    without newlines: a reader that died there would leave the child blocked on a full pipe.
    A run of output without any break is returned in pieces of ``MAX_LOG_LINE_BYTES``.
    """

    _BREAK = re.compile(rb"[\r\n]")

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        self._stream = stream
        self._buffer = b""
        self._lines: collections.deque[bytes] = collections.deque()
        self._eof = False

    async def next_line(self) -> str | None:
        """The next line (without its break), or None at end of output."""
        while not self._lines:
            if self._eof:
                return None
            chunk = await self._stream.read(65536)
            if not chunk:
                self._eof = True
                if self._buffer:
                    self._lines.append(self._buffer)
                    self._buffer = b""
                continue
            *lines, self._buffer = self._BREAK.split(self._buffer + chunk)
            for line in lines:
                self._lines.extend(line[i : i + MAX_LOG_LINE_BYTES] for i in range(0, len(line), MAX_LOG_LINE_BYTES))
            while len(self._buffer) > MAX_LOG_LINE_BYTES:
                self._lines.append(self._buffer[:MAX_LOG_LINE_BYTES])
                self._buffer = self._buffer[MAX_LOG_LINE_BYTES:]
        return self._lines.popleft().decode("utf-8", "replace")
