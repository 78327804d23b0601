"""The model store: pull models from the Hugging Face Hub, list them, remove them, and resolve model names.

Layout: one folder per repo under `store_root()` (`google--gemma-4-E2B-it`), holding the files the model needs
(its vision and audio towers included, unless pulled with `text_only`) plus `hearth.json` (repo id, revision,
commit, pulled-at, whether it is text-only, and the source blob of each file).

Downloads are our own HTTP Range requests on the Hub's `/resolve/` URLs (huggingface_hub supplies the file list,
the endpoint, the token and its typed errors). Reasons: huggingface_hub 2.x deletes a partial file when a
transfer is interrupted, so it cannot resume across runs; and ranges let a text-only pull fetch only the
text-model tensors of a safetensors file that also holds vision/audio towers (written as a smaller, valid
safetensors file).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.filesize import decimal as human_size

DEMO_DIR = Path(__file__).parent / "demo"  # the built-in models shipped in the package, one folder each
DEMO_MODEL = "hearth-demo"  # what `resolve(None)` gives: no model named
DEMO_ALIASES = {"demo": "hearth-demo"}
BUILTIN_NAMES = ("hearth-demo", "hearth-demo-moe", "hearth-demo-vision", "hearth-demo-assistant")
DRAFT_SUFFIX = "-assistant"  # a model's MTP drafter repo: google/gemma-4-E2B-it -> google/gemma-4-E2B-it-assistant

META = "hearth.json"  # per-model metadata, written by `pull`
ALIASES = "aliases.json"  # in the store's root: each name `copy` made, and the name of the model it stands for
PARTIAL = ".partial"  # interrupted downloads, kept to resume
INDEX = "model.safetensors.index.json"
# Everything a text model needs besides its weights (the safetensors files are chosen from the index).
TEXT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What the towers' preprocessing is described by, besides config.json (other runtimes read them; hearthlm does not).
MEDIA_FILES = ("processor_config.json", "preprocessor_config.json")
CONNECT_TIMEOUT = 5.0  # seconds: offline must fail at once, not after a retry loop
READ_TIMEOUT = 60.0  # seconds without a byte before a download gives up (and resumes); HF_HUB_DOWNLOAD_TIMEOUT sets it
_HF_ID = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # no '--' or '..', as on the Hub
_FILE_NAME = re.compile(r"^[\w-][\w.-]{0,254}$")  # a repo file we may write: one plain name, no dot first
_ALIAS = re.compile(r"^[A-Za-z0-9][\w.:-]{0,127}(/[A-Za-z0-9][\w.:-]{0,127})?$")  # a copy's name: a model name
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing on this machine; the message says what to do."""


class StoreError(ValueError):
    """A store operation that is refused (removing a built-in model, a folder outside the store...)."""


class PullError(ValueError):
    """`pull` failed: unknown or gated repo, no usable files, an interrupted transfer."""


class HubUnreachableError(PullError):
    """The Hugging Face Hub cannot be reached (offline, HF_HUB_OFFLINE=1, firewall)."""


# -- names --------------------------------------------------------------------------------------------


def store_root() -> Path:
    """$HEARTHLM_HOME/models, else $XDG_CACHE_HOME/hearthlm/models (~/.cache/hearthlm/models)."""
    if home := os.environ.get("HEARTHLM_HOME"):
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "hearthlm" / "models"


def folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


# -- permissions: what the store creates, only its owner can read (docs/privacy.md: another user who can read a
# checkpoint can tell from its page cache which experts a budgeted run used) ----------------------------------


def private_dir(path: Path) -> Path:
    """`path` and its missing parents, created owner-only (0700); an existing folder keeps its mode (the user's
    choice: the load-time check in moe/options.py warns when it lets others read a checkpoint)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, 0o700)
    return path


def _owner_only(file: str, flags: int) -> int:
    """open()'s opener for files the store writes: created 0600 (mode at creation: no moment when others can
    open it)."""
    return os.open(file, flags, 0o600)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, created owner-only, then moved in place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", opener=_owner_only) as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # an old .tmp left by a crash kept its mode
    os.replace(tmp, path)


@dataclass
class ModelEntry:
    """One model `list_models` knows: built-in, pulled, or a folder/.gguf placed in the store by hand."""

    name: str
    path: Path
    kind: str  # "built-in" | "pulled" | "local"
    repo_id: str | None = None
    complete: bool = True  # False: a pull that did not finish
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def size(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def family(self) -> str:
        if self.path.suffix == ".gguf":
            return "gguf"
        cfg = _read_config(self.path)
        return cfg.get("model_type") or next(iter(cfg.get("architectures") or []), "?")

    def format(self) -> str:
        if self.path.suffix == ".gguf":
            return ".gguf"
        cfg = _read_config(self.path)
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        fmt = "safetensors" + (f" {_DTYPE_NAMES.get(dtype, dtype)}" if dtype else "")
        return fmt if self.complete else fmt + " (incomplete)"

    def inputs(self) -> str:
        """What the model takes: "text", "text, image, audio"; towers its config describes but the folder lacks
        (a `--text-only` pull) are named as missing; a speculative-decoding drafter takes none of its own."""
        if self.path.is_dir() and _read_config(self.path).get("model_type") == "gemma4_assistant":
            return "none: a drafter for --draft"
        declared, present = towers(self.path)
        takes = ", ".join(["text", *(k for k in ("image", "audio") if k in present)])
        missing = [k for k in ("image", "audio") if k in declared - present]
        return takes + (f" ({', '.join(missing)}: towers not pulled)" if missing else "")


_TOWER_PREFIXES = {"image": ("model.vision_tower.", "vision_tower."), "audio": ("model.audio_tower.", "audio_tower.")}


def towers(path: Path) -> tuple[set[str], set[str]]:
    """The inputs besides text that a model's config describes towers for ({"image", "audio"}), and those whose
    tower tensors are there. Read from config.json and the safetensors index or headers; no weights are read.
    A .gguf: the towers of the mmproj file beside it (weights/mmproj.py), declared and present alike."""
    if path.suffix == ".gguf":
        from .weights.mmproj import find_mmproj, mmproj_inputs

        found = find_mmproj(path)
        inputs = mmproj_inputs(found) if found is not None else set()
        return inputs, inputs
    cfg = _read_config(path)
    declared = {k for k, c in (("image", "vision_config"), ("audio", "audio_config")) if cfg.get(c)}
    if not declared:
        return set(), set()
    names = _tensor_names(path)
    present = {k for k in declared if any(n.startswith(_TOWER_PREFIXES[k]) for n in names)}
    return declared, present


def _tensor_names(folder: Path) -> list[str]:
    """Tensor names of a checkpoint folder: its index's, else every safetensors file's header ([] if unreadable)."""
    from .weights.safetensors import CheckpointError, SafetensorsFile

    index = folder / INDEX
    try:
        if index.is_file():
            return list((json.loads(index.read_text()).get("weight_map") or {}).keys())
        return [n for f in sorted(folder.glob("*.safetensors")) for n in SafetensorsFile(f).keys()]
    except (OSError, ValueError, AttributeError, CheckpointError):
        return []


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def _builtins() -> list[ModelEntry]:
    if not DEMO_DIR.is_dir():
        return []
    return [ModelEntry(p.name, p, "built-in") for p in sorted(DEMO_DIR.iterdir()) if (p / "config.json").exists()]


def _stored() -> list[ModelEntry]:
    root = store_root()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):  # work in progress (a quantized copy being written), never a model
            continue
        if p.is_dir() and (meta := _read_meta(p)) is not None:
            repo = meta.get("repo_id") or p.name
            out.append(ModelEntry(repo, p, "pulled", repo, bool(meta.get("complete")), meta))
        elif p.is_dir() and (p / "config.json").exists():
            out.append(ModelEntry(p.name, p, "local"))
        elif p.is_file() and p.suffix == ".gguf":
            out.append(ModelEntry(p.name, p, "local"))
    return out


def _read_aliases() -> dict[str, str]:
    try:
        aliases = json.loads((store_root() / ALIASES).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in aliases.items()} if isinstance(aliases, dict) else {}


def _aliases(models: list[ModelEntry]) -> list[ModelEntry]:
    """An entry for each alias whose model is still here (at that model's path)."""
    out = []
    for alias, target in sorted(_read_aliases().items()):
        found = _match(target, models)
        if len(found) == 1:
            e = found[0]
            out.append(ModelEntry(alias, e.path, "alias", e.repo_id, e.complete, {"alias_of": e.name}))
    return out


def list_models() -> list[ModelEntry]:
    """The built-in demo models, then every model in the store (pulled ones and incomplete pulls included),
    then the aliases `copy` made."""
    models = _builtins() + _stored()
    return models + _aliases(models)


def copy(source: str, destination: str) -> ModelEntry:
    """Make `destination` another name for the model `source` names (an alias kept in the store's root, as
    Ollama's copy makes one); an alias of that name is replaced. Returns the alias's entry."""
    dest = destination.strip()
    if not _ALIAS.match(dest) or ".." in dest:
        raise StoreError(
            f"'{destination[:200]}' is not a model name: use letters, digits, '.', '_', '-', ':' and at most one '/' "
            "(no path, no spaces)"
        )
    models = _builtins() + _stored()
    found = _match(source, models + _aliases(models))
    if len(found) != 1:
        what = "several models: " + ", ".join(e.name for e in found) if found else "no model"
        raise ModelNotFoundError(f"'{source}' matches {what} (see `hearth list`)")
    if _match(dest, models):
        raise StoreError(f"'{dest}' already names a model: choose another name for the copy")
    target = found[0].meta.get("alias_of", found[0].name)
    aliases = _read_aliases()
    aliases[dest] = target
    root = private_dir(store_root())
    write_private(root / ALIASES, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
    return next(e for e in _aliases(models) if e.name == dest)


def _remove_alias(name: str) -> bool:
    aliases = _read_aliases()
    key = next((a for a in aliases if a.lower() == name.lower()), None)
    if key is None:
        return False
    del aliases[key]
    (store_root() / ALIASES).write_text(json.dumps(aliases, indent=2, sort_keys=True) + "\n")
    return True


def _match(name: str, entries: list[ModelEntry]) -> list[ModelEntry]:
    key = name.lower()
    exact = [e for e in entries if key in (e.name.lower(), e.path.name.lower())]
    if exact:
        return exact
    return [e for e in entries if key in (e.short_name.lower(), e.path.stem.lower())]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or name.endswith(".gguf") or name.count("/") > 1


def _builtin(name: str) -> Path:
    path = DEMO_DIR / DEMO_ALIASES.get(name, name)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"the built-in demo model '{path.name}' is missing from this installation ({path}); "
            "name a model instead: a checkpoint folder, a .gguf file, or a Hugging Face id (`hearth pull ID`)"
        )
    return path


def resolve(name: str | Path | None) -> Path:
    """Turn a model name into a local path: None -> the built-in demo; an existing folder or .gguf file -> itself;
    "demo" / a built-in name -> its folder; an HF id ("org/name") or a short name ("name", case-insensitive) ->
    its folder in the store. Raises ModelNotFoundError with what to do when nothing matches."""
    if name is None:
        return _builtin(DEMO_MODEL)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"'{name}' is a file, not a checkpoint folder or a .gguf file")
    if isinstance(name, Path):
        raise ModelNotFoundError(f"'{name}' is not a local checkpoint folder or .gguf file: no such path")
    if name.lower() in DEMO_ALIASES or name.lower() in BUILTIN_NAMES:
        return _builtin(name.lower())
    stored = _stored()
    found = (
        _match(name, stored + _aliases(_builtins() + stored)) if "/" not in name.strip("/").partition("/")[2] else []
    )
    if len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise ModelNotFoundError(f"'{name}' matches several models: {names}; give the full id")
    if found:
        entry = found[0]
        if not entry.complete:
            raise ModelNotFoundError(
                f"the pull of {entry.name} did not finish: run `hearth pull {entry.name}` again (it resumes)"
            )
        return entry.path
    if _looks_like_path(name):
        raise ModelNotFoundError(f"'{name}' is not a local checkpoint folder or .gguf file: no such path")
    if _HF_ID.match(name):
        raise ModelNotFoundError(
            f"'{name}' is neither a local folder nor a pulled model: run `hearth pull {name}` to download it"
        )
    raise ModelNotFoundError(
        f"no model named '{name}': give a checkpoint folder, a .gguf file, or a Hugging Face id "
        "(`hearth pull ID` downloads one; `hearth list` shows what is here)"
    )


def is_hf_id(text: str) -> bool:
    """Whether `text` is shaped like a Hugging Face repo id ("org/name")."""
    return bool(_HF_ID.match(text))


def is_model_name(text: str) -> bool:
    """Whether `text` names a model rather than being a prompt: it resolves, or it is shaped like a path or an
    HF id (so a typo in a model name gets resolve()'s error instead of being answered as a prompt)."""
    try:
        resolve(text)
        return True
    except ModelNotFoundError:
        return " " not in text.strip() and (_looks_like_path(text) or bool(_HF_ID.match(text)))


def remove(name: str) -> Path:
    """Delete a model from the store (no question asked); returns the path removed. Refuses the built-in demo
    models and anything outside the store. An alias (`copy`) is removed alone, leaving its model."""
    if not Path(name).expanduser().exists() and _remove_alias(name):
        return store_root() / ALIASES
    if name.lower() in DEMO_ALIASES or name.lower() in BUILTIN_NAMES:
        raise StoreError(f"'{name}' is a built-in demo model: it ships with hearthlm and cannot be removed")
    root = store_root().resolve()
    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        target = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()  # a link: itself
        if DEMO_DIR.resolve() in target.parents or target == DEMO_DIR.resolve():
            raise StoreError(f"'{name}' is a built-in demo model: it ships with hearthlm and cannot be removed")
        if root not in target.parents:
            raise StoreError(
                f"'{name}' is not in the model store ({root}): `hearth rm` only removes models it pulled; "
                "delete other folders yourself"
            )
    else:
        found = _match(name, _stored())
        if len(found) != 1:
            what = "several models: " + ", ".join(e.name for e in found) if found else "no model in the store"
            raise ModelNotFoundError(f"'{name}' matches {what} (see `hearth list`)")
        target = found[0].path
    if target.is_symlink() or target.is_file():  # a link goes, never what it points to
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        raise StoreError(f"'{name}' is not a model folder or file (a device, socket or pipe): refused")
    return target


# -- pull: plan ---------------------------------------------------------------------------------------


@dataclass
class _Transfer:
    """One file to write into the model folder: `head` (bytes we make ourselves) then source byte ranges."""

    name: str
    url: str
    blob: str  # the source file's blob id: the resume key and the "already have it" key
    size: int | None  # bytes of the local file; None: unknown (then no range requests)
    head: bytes = b""
    ranges: list[tuple[int, int]] | None = None  # [start, end) in the source file; None: the whole file


def _is_text_tensor(name: str) -> bool:
    from .weights.loader import IGNORED  # the loader's list of tower prefixes is the one truth

    return not name.startswith(IGNORED)


def _subset_header(header: dict[str, Any], data_start: int) -> tuple[bytes, list[tuple[int, int]]] | None:
    """A safetensors header for the text tensors only, plus the source ranges of their data, packed in file
    order. None when every tensor is a text tensor, or when packing would move a tensor off its 8-byte
    alignment (writers put the widest dtypes first, so dropping tensors rarely does): download it whole."""
    meta = header.pop("__metadata__", None)
    if all(_is_text_tensor(n) for n in header):
        return None
    kept: dict[str, Any] = {} if meta is None else {"__metadata__": meta}
    ranges: list[tuple[int, int]] = []
    pos = 0
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if not _is_text_tensor(name):
            continue
        a, b = entry["data_offsets"]
        if (a - pos) % 8:
            return None
        kept[name] = {**entry, "data_offsets": [pos, pos + b - a]}
        pos += b - a
        if b == a:
            continue
        if ranges and ranges[-1][1] == data_start + a:
            ranges[-1] = (ranges[-1][0], data_start + b)
        else:
            ranges.append((data_start + a, data_start + b))
    raw = json.dumps(kept, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors writers do
    return struct.pack("<Q", len(raw)) + raw, ranges


@dataclass
class _Hub:
    """What a pull needs to talk to the Hub: endpoint, repo, pinned commit, headers, an HTTP client."""

    endpoint: str
    repo_id: str
    commit: str
    headers: dict[str, str]
    client: Any  # huggingface_hub's shared httpx client (honours set_client_factory, proxies, offline mode)

    def url(self, name: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{quote(name)}"

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        headers = dict(self.headers)
        if start is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        with _hub_errors(self.repo_id, None):
            r = self.client.get(self.url(name), headers=headers, timeout=_timeout())
            _raise_for_status(r)
        if start is not None and r.status_code != 206:
            raise PullError(f"{self.endpoint} ignored a range request for {name}: cannot read safetensors headers")
        return r.content


def _safetensors_plan(hub: _Hub, name: str, blob: str, size: int | None, mixed: bool) -> _Transfer | None:
    """How to fetch one safetensors file: whole, or (towers inside) its text tensors only; None: no text."""
    whole = _Transfer(name, hub.url(name), blob, size)
    if not mixed:
        return whole
    (n,) = struct.unpack("<Q", hub.get(name, 0, 8))
    if size is None or n > min(size - 8, 100 << 20):
        raise PullError(f"{hub.repo_id}/{name}: safetensors header length {n} is not plausible")
    header = json.loads(hub.get(name, 8, 8 + n))
    if not any(_is_text_tensor(k) for k in header if k != "__metadata__"):
        return None
    sub = _subset_header(header, 8 + n)
    if sub is None:
        return whole
    head, ranges = sub
    return _Transfer(name, whole.url, blob, len(head) + sum(b - a for a, b in ranges), head, ranges)


def _plan_weights(
    hub: _Hub, files: dict[str, Any], folder: Path, text_only: bool
) -> tuple[list[_Transfer], dict | None]:
    """Choose the safetensors files: every one, whole; or (`text_only`) those of the text model, cut by ranges.
    Returns the transfers and, for a sharded checkpoint, the index (text-only: rewritten to list the tensors kept)."""
    if INDEX in files and not text_only:
        index = json.loads(hub.get(INDEX))
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise PullError(f"{hub.repo_id}: {INDEX} names {missing[0]}, which the repo does not have")
        return [
            _Transfer(s, hub.url(s), *files[s]) for s in shards if not _have(folder, s, files[s], whole=True)
        ], index
    if INDEX in files:
        index = json.loads(hub.get(INDEX))
        weight_map: dict[str, str] = index.get("weight_map") or {}
        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, []).append(tensor)
        plans = []
        for shard, names in sorted(shards.items()):
            text = [_is_text_tensor(n) for n in names]
            if shard not in files:
                raise PullError(f"{hub.repo_id}: {INDEX} names {shard}, which the repo does not have")
            if any(text) and not _have(folder, shard, files[shard]):  # a whole file serves a text-only pull too
                plan = _safetensors_plan(hub, shard, *files[shard], mixed=not all(text))
                plans += [plan] if plan else []
        kept = {k: v for k, v in weight_map.items() if _is_text_tensor(k)}
        return plans, {**index, "weight_map": kept}
    names = ["model.safetensors"] if "model.safetensors" in files else sorted(files)
    names = [n for n in names if n.endswith(".safetensors") and not n.startswith("consolidated")]
    if not names:
        raise PullError(
            f"{hub.repo_id} has no safetensors weights: `hearth pull` downloads safetensors checkpoints "
            "(for a GGUF repo, download the .gguf file and pass its path)"
        )
    todo = [n for n in names if not _have(folder, n, files[n], whole=not text_only)]
    if todo and not text_only:
        hub.get(todo[0], 0, 8)  # a gated or broken repo fails here, before anything is written
    plans = [_safetensors_plan(hub, n, *files[n], mixed=text_only) for n in todo]
    return [p for p in plans if p], None


def _have(folder: Path, name: str, blob_size: tuple[str, int | None], whole: bool = False) -> bool:
    """Already pulled: same source blob as recorded in hearth.json, and the file is there; `whole`: and not cut to
    its text tensors by a text-only pull (a pull with the towers fetches that file again)."""
    meta = _read_meta(folder) or {}
    rec = (meta.get("files") or {}).get(name)
    fresh = bool(rec) and rec.get("blob") == blob_size[0] and (folder / name).is_file()
    return fresh and not (whole and rec.get("text_only"))


# -- pull: transfer -----------------------------------------------------------------------------------


def _http():
    """The HTTP library under huggingface_hub's session: httpx2 (huggingface_hub 2.x) or httpx (1.x)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _timeout():
    return _http().Timeout(_read_timeout(), connect=CONNECT_TIMEOUT)


def _read_timeout() -> float:
    """HF_HUB_DOWNLOAD_TIMEOUT (whole seconds, as huggingface_hub reads it) or READ_TIMEOUT."""
    given = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT")
    if not given:
        return READ_TIMEOUT
    if not given.strip().isdigit() or int(given) <= 0:
        raise PullError(
            f"HF_HUB_DOWNLOAD_TIMEOUT={given!r}: give the whole seconds a download may wait for data, e.g. 60"
        )
    return float(given)


def _raise_for_status(r) -> None:
    from huggingface_hub.utils import hf_raise_for_status

    hf_raise_for_status(r)


def _write_range(hub: _Hub, t: _Transfer, out, start: int, end: int | None, advance: Callable[[int], None]) -> None:
    """Append source bytes [start, end) (end None: to the end of the file) to `out`."""
    headers = dict(hub.headers)
    ranged = start > 0 or end is not None
    if ranged:
        headers["Range"] = f"bytes={start}-" + (str(end - 1) if end is not None else "")
    with hub.client.stream("GET", t.url, headers=headers, timeout=_timeout()) as r:
        if r.status_code >= 400:
            r.read()
            _raise_for_status(r)
        if ranged and r.status_code != 206:
            if t.ranges is not None:
                raise PullError(f"{hub.endpoint} does not answer range requests: cannot fetch part of {t.name}")
            out.seek(0)  # the server sent the whole file: start over
            out.truncate()
            advance(-start)
        for chunk in r.iter_bytes():
            out.write(chunk)
            out.flush()  # on disk as it arrives: a killed pull keeps every byte it received
            advance(len(chunk))


def _resume(hub: _Hub, t: _Transfer, part: Path, advance: Callable[[int], None]) -> None:
    """Continue `part` from its current size: our own header first, then the remaining source ranges."""
    done = part.stat().st_size if part.exists() else 0
    if t.size is not None and done > t.size:  # not ours to continue: start over
        done = 0
    with open(part, "r+b" if done else "wb", opener=_owner_only) as out:
        out.truncate(done)
        if done < len(t.head):  # a partial header of ours: write it again
            out.truncate(0)
            out.write(t.head)
            advance(len(t.head) - done)
            done = len(t.head)
        out.seek(done)
        if t.ranges is None:
            if t.size is None or done < t.size:
                _write_range(hub, t, out, done, None, advance)
            return
        skip = done - len(t.head)  # bytes of source data already written
        for a, b in t.ranges:
            if skip >= b - a:
                skip -= b - a
                continue
            _write_range(hub, t, out, a + skip, b, advance)
            skip = 0


def _part_path(folder: Path, t: _Transfer) -> Path:
    """Where a transfer's bytes collect: keyed by its source blob, and by whether it is the text tensors only (the
    bytes of a cut file and of the whole one differ, so one never resumes the other)."""
    return folder / PARTIAL / (f"{t.name}.{t.blob[:16]}" + (".text" if t.ranges is not None else ""))


def _download(hub: _Hub, t: _Transfer, folder: Path, advance: Callable[[int], None], retries: int) -> None:
    """Fetch one file into folder/.partial, resuming what an earlier run left; on success move it in place.
    A dropped connection that made progress is retried at once; `retries` failures in a row give up."""
    http = _http()
    part = _part_path(folder, t)
    private_dir(part.parent)
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _resume(hub, t, part, advance)
            break
        except http.TransportError as e:
            now = part.stat().st_size if part.exists() else 0
            failures = 0 if now > before else failures + 1
            if failures > retries:
                raise PullError(
                    f"download of {t.name} was interrupted ({type(e).__name__}: {e}); {now} bytes are kept: "
                    f"run `hearth pull {hub.repo_id}` again to resume"
                ) from None
            time.sleep(0 if failures == 0 else 2.0 ** (failures - 1))
    got = part.stat().st_size
    if t.size is not None and got != t.size:
        part.unlink()
        raise PullError(f"{t.name}: got {got} bytes, expected {t.size}; run `hearth pull {hub.repo_id}` again")
    os.replace(part, folder / t.name)


def _advancer(bar, task, t: _Transfer, part: Path, report) -> Callable[[int], None]:
    """What _download calls with each chunk's size: moves the bar, and tells `report` the file's progress."""
    got = part.stat().st_size if part.exists() else 0
    if report is not None:
        report(t.name, t.blob, got, t.size)

    def advance(n: int) -> None:
        nonlocal got
        got += n
        bar.advance(task, n)
        if report is not None:
            report(t.name, t.blob, got, t.size)

    return advance


# -- pull: errors and the entry point -----------------------------------------------------------------


def _offline_message(endpoint: str, why: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub at {endpoint} ({why}): you seem to be offline. "
        "Models already pulled and local folders still work: see `hearth list`"
    )


class _hub_errors:
    """Context manager: huggingface_hub / httpx errors -> PullError with a message for humans."""

    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or isinstance(e, PullError):
            return False
        from huggingface_hub import errors

        http = _http()
        repo, login = self.repo_id, "set HF_TOKEN to an access token or run `hf auth login` (huggingface-cli login)"
        endpoint = _endpoint()
        if isinstance(e, errors.OfflineModeIsEnabled):
            raise HubUnreachableError(_offline_message(endpoint, "HF_HUB_OFFLINE is set")) from None
        if isinstance(e, (http.ConnectError, http.ConnectTimeout, http.ProxyError)):
            raise HubUnreachableError(_offline_message(endpoint, type(e).__name__)) from None
        if isinstance(e, errors.GatedRepoError):
            raise PullError(
                f"{repo} is gated: accept its terms on {endpoint}/{repo}, then give your token: {login}"
            ) from None
        if isinstance(e, errors.RevisionNotFoundError):
            raise PullError(f"{repo} has no revision '{self.revision}'") from None
        if isinstance(e, errors.RepositoryNotFoundError):
            raise PullError(
                f"{repo} was not found on the Hugging Face Hub; check the id (if it is private: {login})"
            ) from None
        if isinstance(e, errors.HfHubHTTPError):
            code = e.response.status_code if e.response is not None else "?"
            if code in (401, 403):
                raise PullError(f"access to {repo} was refused (HTTP {code}): {login}") from None
            raise PullError(f"the Hub answered HTTP {code} for {repo}: {str(e).strip().splitlines()[0]}") from None
        if isinstance(e, http.TransportError):
            raise PullError(f"talking to {endpoint} failed ({type(e).__name__}: {e}); try again") from None
        return False


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline_env() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or constants.is_offline_mode()


def _connect(repo_id: str, revision: str | None) -> tuple[_Hub, dict[str, tuple[str, int | None]]]:
    """Ask the Hub for the repo's files at `revision`; -> (hub pinned to the commit, {file: (blob, size)})."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import build_hf_headers, get_session

    from . import __version__

    endpoint = _endpoint()
    if _offline_env():
        raise HubUnreachableError(_offline_message(endpoint, "HF_HUB_OFFLINE is set"))
    with _hub_errors(repo_id, revision):
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True, timeout=_timeout())
        headers = build_hf_headers(library_name="hearthlm", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # byte ranges and sizes must mean the file's own bytes
    files = {}
    for s in info.siblings or []:
        if _FILE_NAME.match(s.rfilename):  # top-level plain names only (never original/, onnx/..., '..')
            size = s.lfs.size if s.lfs else s.size
            files[s.rfilename] = (s.lfs.sha256 if s.lfs else s.blob_id) or info.sha or "", size
    if "config.json" not in files:
        raise PullError(f"{repo_id} has no config.json: not a transformers checkpoint that hearthlm can run")
    return _Hub(endpoint, repo_id, info.sha or revision or "main", headers, get_session()), files


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_private(folder / META, json.dumps(meta, indent=2) + "\n")


def pull(
    repo_id: str,
    revision: str | None = None,
    *,
    progress: bool = True,
    retries: int = 3,
    console=None,
    report: Callable[[str, str, int, int | None], None] | None = None,
    text_only: bool = False,
) -> Path:
    """Download Hugging Face repo `repo_id`'s model into the store, its vision and audio towers included (a
    multimodal Gemma 4 checkpoint); `text_only`: only what the text model needs (tower tensors cut out of shared
    safetensors files by byte ranges). Returns its folder. Resumes an interrupted pull; skips files already pulled
    at the same blob. Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. `report(file, blob, completed, total)`:
    called as each file's bytes arrive (the server's pull progress)."""
    if not _HF_ID.match(repo_id):
        raise PullError(f"'{repo_id}' is not a Hugging Face repo id (like google/gemma-4-E2B-it)")
    _read_timeout()  # checked before huggingface_hub reads it on import
    hub, files = _connect(repo_id, revision)
    folder = store_root() / folder_name(repo_id)
    wanted = TEXT_FILES + (() if text_only else MEDIA_FILES)
    small = [_Transfer(n, hub.url(n), *files[n]) for n in wanted if n in files and not _have(folder, n, files[n])]
    with _hub_errors(repo_id, revision):
        weights, index = _plan_weights(hub, files, folder, text_only)  # before any write: a bad repo leaves nothing
    transfers = small + weights
    private_dir(folder)
    meta = _read_meta(folder) or {}
    meta.update(repo_id=repo_id, revision=revision or "main", commit=hub.commit, complete=False, text_only=text_only)
    meta.setdefault("files", {})
    if index is not None:
        write_private(folder / INDEX, json.dumps(index, indent=2) + "\n")
        meta["files"][INDEX] = {"blob": files[INDEX][0]} | ({"text_only": True} if text_only else {})
    _write_meta(folder, meta)
    _check_space(folder, transfers)
    try:
        with _hub_errors(repo_id, revision):
            _transfer_all(hub, transfers, folder, meta, progress, retries, console, report)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PullError(
            f"no space left on the device holding {folder} ({e.strerror}); the bytes fetched so far are kept: free "
            f"some space and run `hearth pull {repo_id}` again to resume, or `hearth rm {repo_id}` to drop them"
        ) from None
    wanted = set(meta["files"]) & ({t.name for t in transfers} | _kept(folder, files, index, text_only))
    for stale in set(meta["files"]) - wanted:  # files of an older commit that this one no longer has
        (folder / stale).unlink(missing_ok=True)
    meta.update(files={n: meta["files"][n] for n in sorted(wanted)}, complete=True)
    meta["pulled_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_meta(folder, meta)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    return folder


def draft_repo(repo_id: str) -> str:
    """The repo of `repo_id`'s speculative-decoding drafter, as Google names Gemma 4's MTP drafters."""
    return repo_id.rstrip("/") + DRAFT_SUFFIX


def pull_draft(repo_id: str, revision: str | None = None, **options) -> Path:
    """Pull `repo_id`'s drafter (draft_repo) into the store beside it, where `--draft auto` finds it. `revision`
    is the drafter repo's own (default: main). A model without a drafter repo is a PullError that says so."""
    drafter = draft_repo(repo_id)
    try:
        return pull(drafter, revision, **options)
    except PullError as e:
        if "was not found" not in str(e):
            raise
        raise PullError(
            f"{repo_id} has no drafter on the Hub ({drafter} was not found): MTP drafters exist for Gemma 4 "
            f"(google/gemma-4-*-it); pull without --with-draft and use `--draft lookup` (prompt lookup) instead"
        ) from None


def _kept(folder: Path, files: dict[str, Any], index: dict | None, text_only: bool) -> set[str]:
    """Names of this commit's files that the folder should keep (already there, unchanged)."""
    names = {n for n in TEXT_FILES + (() if text_only else MEDIA_FILES) if n in files}
    if index is not None:
        return names | {INDEX} | set(index["weight_map"].values())
    return names | {n for n in files if n.endswith(".safetensors") and (folder / n).is_file()}


def _check_space(folder: Path, transfers: list[_Transfer]) -> None:
    need = sum(t.size or 0 for t in transfers)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PullError(
            f"not enough disk space in {folder}: the download needs {human_size(need)}, {human_size(free)} free"
        )


def _transfer_all(hub, transfers, folder, meta, progress, retries, console, report=None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    if not transfers:
        return
    console = console or Console(stderr=True)
    total = sum(t.size or 0 for t in transfers)
    parts = [_part_path(folder, t) for t in transfers]
    resumed = sum(p.stat().st_size for p in parts if p.exists())
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    live = progress and console.is_terminal
    with Progress(*columns, TimeRemainingColumn(), console=console, disable=not live) as bar:
        task = bar.add_task(f"pulling {hub.repo_id}", total=total or None, completed=min(resumed, total))
        for t in transfers:
            bar.update(task, description=f"{hub.repo_id}: {t.name}")
            if progress and not live:  # a log, not a terminal: one line per file
                console.print(f"{hub.repo_id}: {t.name} ({human_size(t.size or 0)})", highlight=False)
            _download(hub, t, folder, _advancer(bar, task, t, _part_path(folder, t), report), retries)
            meta["files"][t.name] = {"blob": t.blob, "size": t.size} | ({"text_only": True} if t.ranges else {})
            _write_meta(folder, meta)
