"""LoRA files on disk: the adapters directory, sidecars, safetensors headers and hashes.

Torch-free on purpose: ``python -m engine adapters`` lists a directory without loading any
model, and the bot side may read this too. Each adapter is ``NAME.safetensors`` with an
optional ``NAME.json`` sidecar::

    {"kind": "style", "triggers": ["watercolor"], "default_weight": 0.8,
     "description": "...", "base_model": "animagine-xl-3.1", "sha256": "<64 hex>"}

Without a sidecar (or where it leaves a field out) the adapter weighs the configured default and
takes its kind (``arcae.kind``, written by Arcae's exports), description, trigger words and base
model from the metadata in the safetensors header (``ss_*``, ``modelspec.*``) when there is some;
with no kind there it is ``other`` (``lcm`` when it is the configured LCM adapter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.fsutil import write_json_atomic
from engine.contract.protocol import ADAPTER_NAME_PATTERN, AdapterInfo
from engine.contract.distilled_mix import HEADER_KEY, SIDECAR_KEY, parse_stored

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
KINDS = ("style", "character", "lcm", "other")
# A real LoRA header is a few hundred KB at most; a bigger length field means a corrupt file.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TRIGGERS_FROM_TAGS = 5
_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class LoraFileError(ValueError):
    """A file is not a readable safetensors LoRA; the message says why."""


@dataclass(frozen=True)
class LoraHeader:
    """What the safetensors header says: tensor shapes, metadata and the detected key format."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    format: str  # peft | kohya | kohya-sgm | lycoris | none
    header_len: int


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of the directory, as scanned (no model involved)."""

    name: str
    path: Path
    kind: str = "other"
    triggers: tuple[str, ...] = ()
    default_weight: float = 1.0
    description: str = ""
    base_model: str = ""
    sha256: str = ""
    addnet_hash: str = ""  # A1111/kohya hash of the tensor data (after the header)
    format: str = ""
    size: int = 0
    mtime_ns: int = 0
    has_sidecar: bool = False
    # The adapter mix a distilled few-step adapter was made for (``engine.contract.distilled_mix``).
    distilled_for: tuple[tuple[str, float], ...] | None = None
    # Why the file cannot be loaded (unreadable header, no LoRA keys); None when it looks fine.
    problem: str | None = None
    notes: tuple[str, ...] = field(default=())

    def to_info(self) -> AdapterInfo:
        return AdapterInfo(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            triggers=list(self.triggers),
            default_weight=self.default_weight,
            description=self.description,
            base_model=self.base_model,
            format=self.format,
            sha256=self.sha256,
        )


# ------------------------------------------------------------------ safetensors header


def read_header(path: Path) -> LoraHeader:
    """Parse the safetensors header of ``path``; raise ``LoraFileError`` saying what is wrong."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise LoraFileError("file is too short to be a safetensors file")
            n = int.from_bytes(raw_len, "little")
            size = os.fstat(f.fileno()).st_size
            if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise LoraFileError("not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as exc:
        raise LoraFileError(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFileError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraFileError("not a safetensors file (header is not a JSON object)")
    meta_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or "shape" not in info or "data_offsets" not in info:
            raise LoraFileError(f"not a safetensors file (bad entry for {key!r})")
        end = info["data_offsets"][1] if len(info["data_offsets"]) == 2 else -1
        if not isinstance(end, int) or 8 + n + end > size:
            raise LoraFileError("truncated safetensors file (tensor data past the end of the file)")
        shapes[key] = tuple(int(d) for d in info["shape"])
    return LoraHeader(shapes=shapes, metadata=metadata, format=detect_format(shapes), header_len=n)


# Network types from model sites that diffusers 0.42.1 / peft 0.21.2 cannot load into SDXL, by a
# key part only they have, and why (checked on the tiny model: LoHa/LoKr/Tucker raise "keys have not
# been correctly renamed"; DoRA loads with its ``dora_scale`` magnitudes silently dropped).
REFUSED_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "loha": ((".hada_w1", ".hada_t1"), "LyCORIS LoHa files (hada_* keys) cannot be loaded by diffusers for SDXL"),
    "lokr": ((".lokr_w1",), "LyCORIS LoKr files (lokr_* keys) cannot be loaded by diffusers for SDXL"),
    "dora": ((".dora_scale",), "DoRA files (dora_scale keys) are refused: diffusers drops their magnitude "
             "vectors, so the adapter would not look as it was trained"),
    "locon-tucker": ((".lora_mid.",), "LoCon files with Tucker decomposition (lora_mid keys) cannot be loaded "
                     "by diffusers for SDXL"),
    "oft": ((".oft_blocks", ".oft_diag", ".oft_R"), "LyCORIS OFT/BOFT files cannot be loaded by diffusers for SDXL"),
    "ia3": ((".on_input",), "LyCORIS (IA)^3 files cannot be loaded by diffusers for SDXL"),
    "glora": ((".a1.weight", ".b1.weight"), "LyCORIS GLoRA files cannot be loaded by diffusers for SDXL"),
    "lycoris-full": ((".diff$", ".diff_b$"), "LyCORIS full (diff) files cannot be loaded by diffusers for SDXL"),
}
REFUSED_HINT = "; use a LoRA or LoCon version of it (most model pages offer one)"


def _has_part(key: str, part: str) -> bool:
    """``part`` inside ``key``; a trailing ``$`` means at its end."""
    return key.endswith(part[:-1]) if part.endswith("$") else part in key


def detect_format(keys: Any) -> str:
    """The key convention of a state dict's keys: peft, kohya, kohya-sgm, none, or a ``REFUSED_FORMATS`` name.

    kohya LoCon (conv layers as ``lora_down``/``lora_up``) is plain kohya here: it loads.
    """
    keys = list(keys)
    for name, (parts, _) in REFUSED_FORMATS.items():
        if any(_has_part(k, p) for k in keys for p in parts):
            return name
    kohya = [k for k in keys if k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))]
    if kohya:
        sgm = any(p in k for k in kohya for p in ("_input_blocks_", "_middle_block_", "_output_blocks_"))
        return "kohya-sgm" if sgm else "kohya"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "peft"
    return "none"


# ------------------------------------------------------------------ key names

# transformers 5.x ``CLIPTextModel`` (CLIP-L) has no ``text_model`` level, so LoRA keys taken from
# its live module names lack it; A1111, ComfyUI, kohya (and diffusers' own docs) name CLIP modules
# as in the original layout, ``text_model.encoder.layers.N...``. Only these top-level parts live
# under ``text_model`` (``text_projection`` of CLIP-G sits beside it).
_TEXT_MODEL_PARTS = ("encoder.", "embeddings.", "final_layer_norm.")
_KOHYA_TEXT_MODEL_PARTS = ("encoder_", "embeddings_", "final_layer_norm")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
_KOHYA_TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")


def standard_lora_key(key: str) -> str:
    """A LoRA key with the text-encoder module path every tool expects (``text_model`` level added).

    Handles diffusers-file keys (``text_encoder.encoder.layers.0...`` ->
    ``text_encoder.text_model.encoder.layers.0...``) and kohya keys (``lora_te1_encoder_layers_0_...``
    -> ``lora_te1_text_model_encoder_layers_0_...``); every other key is returned unchanged.
    """
    for prefix in _TEXT_ENCODER_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return prefix + "text_model." + rest if rest.startswith(_TEXT_MODEL_PARTS) else key
    for prefix in _KOHYA_TEXT_ENCODER_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return prefix + "text_model_" + rest if rest.startswith(_KOHYA_TEXT_MODEL_PARTS) else key
    return key


# ------------------------------------------------------------------ hashes


def file_hashes(path: Path, header_len: int | None = None) -> tuple[str, str]:
    """(sha256 of the whole file, A1111 addnet hash) in one read.

    The addnet hash is A1111's ``addnet_hash_safetensors``: sha256 of the bytes after the
    8-byte length and the JSON header, so editing metadata does not change it. It is empty
    when the file has no valid header length.
    """
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        first = f.read(8)
        whole.update(first)
        if header_len is None and len(first) == 8:
            header_len = int.from_bytes(first, "little")
        skip = header_len if header_len is not None else -1
        valid = len(first) == 8 and 0 < skip <= os.fstat(f.fileno()).st_size
        if valid:
            head = f.read(skip)
            whole.update(head)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            whole.update(chunk)
            if valid:
                data.update(chunk)
    return whole.hexdigest(), (data.hexdigest() if valid else "")


class HashCache:
    """Hashes by (path, size, mtime): a rescan rehashes only files that changed. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, int, str, str]] = {}

    def get(self, path: Path, size: int, mtime_ns: int, header_len: int | None) -> tuple[str, str]:
        with self._lock:
            hit = self._cache.get(path)
        if hit and hit[0] == size and hit[1] == mtime_ns:
            return hit[2], hit[3]
        sha, addnet = file_hashes(path, header_len)
        with self._lock:
            self._cache[path] = (size, mtime_ns, sha, addnet)
        return sha, addnet


# ------------------------------------------------------------------ sidecars and metadata


def _read_sidecar(path: Path) -> tuple[dict[str, Any], list[str], bool]:
    """The sidecar's valid fields, a note for each invalid one (ignored), and whether it parsed."""
    notes: list[str] = []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, notes, False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, [f"sidecar {path.name} ignored: not valid JSON ({exc})"], False
    if not isinstance(data, dict):
        return {}, [f"sidecar {path.name} ignored: expected a JSON object"], False
    out: dict[str, Any] = {}
    checks = {
        "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
        "triggers": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
        "default_weight": (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and -4.0 <= v <= 4.0,
            "a number from -4 to 4",
        ),
        "description": (lambda v: isinstance(v, str), "a string"),
        "base_model": (lambda v: isinstance(v, str), "a string"),
        "sha256": (lambda v: isinstance(v, str) and bool(_HEX64_RE.fullmatch(v.lower())), "64 hex digits"),
        SIDECAR_KEY: (lambda v: parse_stored(v) is not None, "a list of [adapter name, weight] pairs"),
    }
    for key, value in data.items():
        check = checks.get(key)
        if check is None:
            continue  # other tools may keep their own keys here
        if check[0](value):
            out[key] = value.lower() if key == "sha256" else value
        else:
            notes.append(f"sidecar {path.name}: {key} = {value!r} ignored (must be {check[1]})")
    return out, notes, True


def defaults_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Kind, description, triggers and base model from Arcae (``arcae.kind``), kohya (``ss_*``) and
    modelspec header metadata."""
    out: dict[str, Any] = {}
    kind = metadata.get("arcae.kind", "").strip()
    if kind in KINDS:
        out["kind"] = kind
    distilled = parse_stored(metadata.get(HEADER_KEY, ""))
    if distilled is not None:
        out[SIDECAR_KEY] = distilled
    desc = metadata.get("modelspec.description") or metadata.get("modelspec.title") or metadata.get("ss_output_name")
    if desc:
        out["description"] = desc.strip()[:500]
    phrase = metadata.get("modelspec.trigger_phrase", "")
    triggers = [t.strip() for t in phrase.split(",") if t.strip()]
    if not triggers:
        triggers = _top_tags(metadata.get("ss_tag_frequency", ""))
    if triggers:
        out["triggers"] = triggers
    base = metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    if base:
        out["base_model"] = base.strip()[:200]
    return out


def _top_tags(tag_frequency_json: str) -> list[str]:
    """kohya's ``ss_tag_frequency`` ({dataset: {tag: count}}) -> the most frequent tags."""
    if not tag_frequency_json:
        return []
    try:
        data = json.loads(tag_frequency_json)
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] += int(n)
    return [t for t, _ in counts.most_common(MAX_TRIGGERS_FROM_TAGS)]


# ------------------------------------------------------------------ the directory


def adapter_name_problem(stem: str) -> str | None:
    """Why ``stem`` cannot be an adapter name, or None when it can."""
    if _NAME_RE.fullmatch(stem):
        return None
    return (
        "adapter names are 1-64 characters: letters, digits, '_', '.', '-', "
        "starting with a letter or digit"
    )


def scan_entry(
    path: Path,
    *,
    default_weight: float,
    lcm_adapter: str,
    hashes: HashCache,
    write_sidecars: bool,
) -> AdapterEntry:
    """Read one ``NAME.safetensors`` and its sidecar into an ``AdapterEntry``."""
    name = path.name[: -len(SUFFIX)]
    stat = path.stat()
    problem = None
    header: LoraHeader | None = None
    try:
        header = read_header(path)
        if header.format == "none":
            problem = "it contains no LoRA weights (no lora_A/lora_B, lora_down/lora_up keys)"
        elif header.format in REFUSED_FORMATS:
            problem = REFUSED_FORMATS[header.format][1] + REFUSED_HINT
    except LoraFileError as exc:
        problem = str(exc)
    sha, addnet = hashes.get(path, stat.st_size, stat.st_mtime_ns, header.header_len if header else None)
    sidecar_path = path.with_suffix(".json")
    side, notes, parsed = _read_sidecar(sidecar_path)
    has_sidecar = sidecar_path.is_file()
    # Header metadata fills what the sidecar leaves out; the sidecar wins where it speaks.
    fields: dict[str, Any] = defaults_from_metadata(header.metadata if header else {})
    fields.update({k: v for k, v in side.items() if k != "sha256"})
    recorded = side.get("sha256")
    if recorded and recorded != sha:
        notes.append(f"file changed since its sidecar was written (sha256 was {recorded[:12]}, now {sha[:12]})")
    # Filled in when absent, never overwritten: a mismatch may be a sidecar installed just before
    # its weights (training.data.lifecycle renames the sidecar first), which the next scan sorts out.
    if parsed and write_sidecars and not recorded:
        _update_sidecar_sha(sidecar_path, sha)
    kind = fields.get("kind") or ("lcm" if name == lcm_adapter else "other")
    return AdapterEntry(
        name=name,
        path=path,
        kind=kind,
        triggers=tuple(fields.get("triggers", ())),
        default_weight=float(fields.get("default_weight", default_weight)),
        description=fields.get("description", ""),
        base_model=fields.get("base_model", ""),
        sha256=sha,
        addnet_hash=addnet,
        format=header.format if header else "invalid",
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        has_sidecar=has_sidecar,
        distilled_for=parse_stored(fields[SIDECAR_KEY]) if SIDECAR_KEY in fields else None,
        problem=problem,
        notes=tuple(notes),
    )


def _update_sidecar_sha(sidecar: Path, sha: str) -> None:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        data["sha256"] = sha
        write_json_atomic(sidecar, data)
    except (OSError, ValueError) as exc:
        log.warning("could not record sha256 in %s: %s", sidecar, exc)


def scan_directory(
    adapters_dir: Path,
    *,
    default_weight: float = 1.0,
    lcm_adapter: str = "",
    hashes: HashCache | None = None,
    write_sidecars: bool = False,
) -> dict[str, AdapterEntry]:
    """Every adapter in ``adapters_dir`` by name (sorted). A missing directory holds none.

    Files whose stem is not a valid adapter name are skipped with a warning saying why;
    hidden files (temp files of atomic writes) are skipped silently.
    """
    hashes = hashes or HashCache()
    entries: dict[str, AdapterEntry] = {}
    if not adapters_dir.is_dir():
        return entries
    for path in sorted(adapters_dir.iterdir()):
        if not path.name.endswith(SUFFIX) or path.name.startswith("."):
            continue
        stem = path.name[: -len(SUFFIX)]
        why = adapter_name_problem(stem)
        if why:
            log.warning("skipping %s: %s", path, why)
            continue
        if not path.is_file():
            continue
        try:
            entry = scan_entry(
                path, default_weight=default_weight, lcm_adapter=lcm_adapter, hashes=hashes, write_sidecars=write_sidecars
            )
        except OSError as exc:  # vanished or unreadable between listing and reading
            log.warning("skipping %s: %s", path, exc.strerror or exc)
            continue
        for note in entry.notes:
            log.warning("adapter %s: %s", entry.name, note)
        entries[entry.name] = entry
    return entries

