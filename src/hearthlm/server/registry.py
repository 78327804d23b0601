"""Which models a server serves, and the one a request names.

`hearth serve` serves every model in the store (`hearth list`, the demo models and aliases included): a request
loads the model it names on first use, and requests that come while it loads wait for it. A model stays loaded
while a request that named it is open, then for its keep_alive (Ollama's field; the server's default
otherwise; 0: unload now; negative: forever). Loading a model that would pass the memory budget first unloads
idle models, least recently used first, and waits for busy ones to finish. `hearth serve MODEL` pins one model:
it is loaded at start, never unloaded, and is the only one served.

A model's size is measured once loaded (its tensors and KV cache); before that, its files' size stands in."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from .. import store
from .catalog import Card, card
from .errors import APIError
from .generation import ServedModel

log = logging.getLogger("hearthlm.server")

FOREVER = math.inf
DEFAULT_KEEP_ALIVE = 300.0  # seconds: Ollama's default of 5 minutes
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

# The slots a request holds (the models it named), set per HTTP request by the app's middleware.
_held: contextvars.ContextVar[list[Slot] | None] = contextvars.ContextVar("hearthlm_held", default=None)


def keep_alive_seconds(value: object) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "0"); negative: forever.
    None stays None (the default applies). Anything else raises APIError 400."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (text := value.strip()):
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
        parts = _DURATION.findall(body)
        if body in ("0",):
            seconds = 0.0
        elif body.replace(".", "", 1).isdigit():
            seconds = sign * float(body)
        elif parts and "".join(n + u for n, u in parts) == body:
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
        else:
            seconds = math.nan
    else:
        seconds = math.nan
    if math.isnan(seconds):
        raise APIError(400, f"keep_alive {value!r} is not a duration: give seconds or a string like '5m' or '1h'",
                       "keep_alive")  # fmt: skip
    return FOREVER if seconds < 0 else seconds


@dataclass
class Slot:
    """One servable model and, once loaded, its ServedModel."""

    name: str
    path: Path
    model: ServedModel | None = None
    loading: asyncio.Future | None = None
    pinned: bool = False
    busy: int = 0  # open requests that named it
    keep_alive: float = DEFAULT_KEEP_ALIVE
    expires: float = FOREVER  # wall-clock time it unloads at, once idle
    last_used: float = field(default_factory=time.monotonic)
    size: int = 0  # bytes: measured when it last loaded


def loaded_bytes(model: ServedModel) -> int:
    """The memory a loaded model holds: its tensors (each storage once) and its engine's KV cache."""
    seen, total = set(), 0
    for t in [*model.llm.model.parameters(), *model.llm.model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    cache = getattr(getattr(model.engine, "engine", None), "cache", None)  # None: an engine stand-in (tests)
    kv = [*cache.k.values(), *cache.v.values()] if cache is not None else []
    return total + sum(t.nbytes for t in kv)


class Models:
    """The servable models of one server. `load(path, name)` loads one (in a worker thread); `budget`: bytes
    that loaded models may hold together (None: no limit)."""

    def __init__(self, load: Callable[[Path, str], ServedModel] | None = None, *, budget: int | None = None,
                 keep_alive: float = DEFAULT_KEEP_ALIVE, pinned: ServedModel | None = None):  # fmt: skip
        self._load, self.budget, self.keep_alive = load, budget, keep_alive
        self._slots: dict[Path, Slot] = {}
        self._changed: asyncio.Event | None = None  # set when a request ends or a model unloads
        self.pinned = pinned
        if pinned is not None:
            slot = Slot(pinned.name, pinned.llm.path.resolve(), pinned, pinned=True, keep_alive=FOREVER)
            slot.size = loaded_bytes(pinned)
            self._slots[slot.path] = slot

    # -- names -------------------------------------------------------------------------------------
    def servable(self) -> list[tuple[str, Path]]:
        """(name, path) of every model this server serves, in `hearth list` order."""
        if self.pinned is not None:
            return [(self.pinned.name, self.pinned.llm.path)]
        return [(e.name, e.path) for e in store.list_models() if e.complete]

    def cards(self) -> list[Card]:
        out = []
        for name, path in self.servable():
            try:
                out.append(card(name, path))
            except Exception as e:  # a broken folder in the store is left out of the list, not a 500
                log.warning("cannot describe %s (%s): %s", name, path, e)
        return out

    def find(self, name: str | None) -> tuple[str, Path]:
        """The (name, path) that `name` names; an Ollama-style ':latest' tag is accepted. APIError 404 if none."""
        key = (name or "").strip().lower().removesuffix(":latest")
        if self.pinned is not None:
            if key in self.pinned.aliases:
                return self.pinned.name, self.pinned.llm.path
            raise APIError(404, f"model '{name}' not found: this server serves '{self.pinned.name}'", "model",
                           "model_not_found")  # fmt: skip
        entries = [e for e in store.list_models() if e.complete]
        key = store.DEMO_ALIASES.get(key, key)
        for keys in (lambda e: (e.name, e.path.name), lambda e: (e.short_name, e.path.stem)):
            found = [e for e in entries if key in {k.lower() for k in keys(e)}]
            if len(found) == 1 or (found and len({e.path for e in found}) == 1):
                return found[0].name, found[0].path
            if found:
                names = ", ".join(e.name for e in found)
                raise APIError(400, f"'{name}' matches several models: {names}; give the full name", "model")
        raise APIError(404, f"model '{name}' not found: GET /api/tags lists what this server serves, and "
                       "`hearth pull ID` (or POST /api/pull) downloads a model", "model", "model_not_found")  # fmt: skip

    def card(self, name: str | None) -> Card:
        listed, path = self.find(name)
        return card(listed, path)

    # -- loading -----------------------------------------------------------------------------------
    def _slot(self, name: str | None) -> Slot:
        listed, path = self.find(name)
        key = path.resolve()
        if key not in self._slots:
            self._slots[key] = Slot(listed, path, keep_alive=self.keep_alive)
        return self._slots[key]

    async def get(self, name: str | None, keep_alive: object = None) -> ServedModel:
        """The loaded model that `name` names, loading it first if need be (waiting for a load in progress).
        The model stays loaded while the current HTTP request is open."""
        slot = self._slot(name)
        wanted = keep_alive_seconds(keep_alive)
        held = _held.get()
        if held is not None and slot not in held:
            held.append(slot)
            slot.busy += 1
        slot.last_used = time.monotonic()
        if wanted is not None and not slot.pinned:
            slot.keep_alive = wanted
        try:
            while slot.model is None:
                if slot.loading is None:
                    slot.loading = asyncio.ensure_future(self._load_slot(slot))
                await asyncio.shield(slot.loading)
        except BaseException:
            if held is not None and slot in held:
                held.remove(slot)
                self._release(slot)
            raise
        return slot.model

    async def _load_slot(self, slot: Slot) -> None:
        try:
            await self._make_room(slot)
            if self._load is None:
                raise APIError(404, f"model '{slot.name}' is not loaded and this server loads no models")
            log.info("loading %s from %s", slot.name, slot.path)
            model = await asyncio.to_thread(self._load, slot.path, slot.name)
            slot.size = loaded_bytes(model)
            slot.model = model
            self._trim(slot)
        except APIError:
            raise
        except Exception as e:  # the reason goes to every waiting request; the server goes on
            log.exception("loading %s failed", slot.name)
            raise APIError(500, f"model '{slot.name}' failed to load: {type(e).__name__}: {e}") from None
        finally:
            slot.loading = None

    def _estimate(self, slot: Slot) -> int:
        """Its size when it last loaded, else its files' size (the KV cache is counted once it loads)."""
        if slot.size:
            return slot.size
        try:
            return card(slot.name, slot.path).size
        except Exception:
            return 0

    def _idle_lru(self, keep: Slot) -> list[Slot]:
        idle = (s for s in self.loaded() if s is not keep and not s.busy and not s.pinned)
        return sorted(idle, key=lambda s: s.last_used)

    def _too_big(self, slot: Slot, need: int) -> APIError:
        return APIError(507, f"model '{slot.name}' needs about {need / 1e9:.2f} GB, more than the memory budget of "
                        f"{self.budget / 1e9:.2f} GB; `hearth serve --max-memory` sets it", "model",
                        "insufficient_memory")  # fmt: skip

    def _trim(self, slot: Slot) -> None:
        """After a load, measured: unload idle models, least recently used first, while past the budget; a model
        that alone passes it is unloaded again and refused."""
        if self.budget is not None and slot.size > self.budget:
            slot.model.engine.shutdown()
            slot.model = None
            raise self._too_big(slot, slot.size)
        while self.budget is not None and sum(s.size for s in self.loaded()) > self.budget:
            idle = self._idle_lru(slot)
            if not idle:
                log.warning("loaded models hold more than the memory budget; others are busy")
                return
            self.unload(idle[0])

    async def _make_room(self, slot: Slot) -> None:
        """Unload idle models, least recently used first, until `slot` fits the budget; wait for busy ones."""
        if self.budget is None:
            return
        need = self._estimate(slot)
        while True:
            loaded = [s for s in self.loaded() if s is not slot]
            if sum(s.size for s in loaded) + need <= self.budget:
                return
            idle = self._idle_lru(slot)
            if idle:
                self.unload(idle[0])
                continue
            if not loaded or all(s.pinned for s in loaded):
                raise self._too_big(slot, need)
            await self._event().wait()  # a busy model's request will end
            self._event().clear()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    # -- unloading ---------------------------------------------------------------------------------
    def unload(self, slot: Slot) -> None:
        """Unload now (its open requests fail). The pinned model stays."""
        if slot.pinned or slot.model is None:
            return
        model, slot.model = slot.model, None
        log.info("unloading %s", slot.name)
        model.engine.shutdown()
        del model
        gc.collect()
        self._event().set()

    def unload_named(self, name: str | None) -> bool:
        """Unload the model `name` names if it is loaded and idle but for this request; whether it was."""
        slot = self._slots.get(self.find(name)[1].resolve())
        if slot is None or slot.model is None or slot.pinned:
            return False
        slot.keep_alive, slot.expires = 0.0, time.time()
        if slot.busy <= (1 if slot in (_held.get() or []) else 0):
            self.unload(slot)
        return True

    def _release(self, slot: Slot) -> None:
        slot.busy -= 1
        slot.last_used = time.monotonic()
        if slot.busy == 0:
            slot.expires = time.time() + slot.keep_alive
            if slot.keep_alive == 0:
                self.unload(slot)
        self._event().set()

    def expire(self) -> None:
        """Unload every idle model whose keep_alive has passed."""
        now = time.time()
        for slot in list(self._slots.values()):
            if slot.model is not None and not slot.busy and slot.expires <= now:
                self.unload(slot)

    def loaded(self) -> list[Slot]:
        return [s for s in self._slots.values() if s.model is not None]

    def forget(self, path: Path) -> None:
        """A model deleted from the store: unload it and drop its slot."""
        slot = self._slots.pop(path.resolve(), None)
        if slot is not None:
            self.unload(slot)

    def shutdown(self) -> None:
        for slot in self._slots.values():
            if slot.model is not None:
                slot.model.engine.shutdown()

    # -- the HTTP request's hold on the models it names ---------------------------------------------
    def hold(self) -> contextvars.Token:
        return _held.set([])

    def holding(self) -> list[str]:
        """The names of the models the current HTTP request named."""
        return [slot.name for slot in _held.get() or []]

    def release(self, token: contextvars.Token) -> None:
        held = _held.get() or []
        _held.reset(token)
        for slot in held:
            self._release(slot)


async def served(request: Request, name: str | None, keep_alive: object = None) -> ServedModel:
    """The model that `name` names, loaded if need be (awaits a model still loading); APIError 404 for a name
    this server cannot serve. `keep_alive`: Ollama's field (seconds, a duration string, or negative: forever)."""
    return await models(request).get(name, keep_alive)


def models(request: Request) -> Models:
    return request.app.state.models
