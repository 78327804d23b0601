"""A Drafter that runs a Gemma 4 MTP drafter (models/gemma4_assistant.py) over the target's paged KV cache.

Per step, for the sequences that may draft: the target's hidden state at the position before the last token
(the runner keeps it on the sequence: Sequence.hidden, for drafters with `reads_hidden`), the target's K/V of
its last full and last sliding layer that store K/V (read from the paged cache through the sequence's block
tables), and k greedy steps of the drafter, all sequences in one batch. The drafter writes no cache, so a
rejected draft leaves nothing to roll back.

Sliding layers read the last `sliding_window + 1` positions as transformers does, where the sequence's
sliding-window blocks still hold them: past the window the engine may have released the block of the oldest
one or two of them (it keeps what the target's next query reads), and the drafter then reads fewer. Drafts
only set the speed; the output is the target's either way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..models.base import CausalLM
from ..models.gemma4_assistant import Gemma4Assistant, PagedKV, TargetKV, load_assistant
from ..store import DRAFT_SUFFIX, META
from .paged_cache import PagedKVCache
from .sequence import Sequence

log = logging.getLogger("hearthlm.engine")

_TYPES = {"full_attention": None, "sliding_attention": "sliding"}


def producers(target: CausalLM) -> dict[str, int]:
    """Layer type -> the target's last layer of that type that stores its own K/V (the one the drafter reads)."""
    found: dict[str, int] = {}
    for i, spec in enumerate(target.config.layers):
        if spec.kv_source is None:
            found["sliding_attention" if spec.sliding_window else "full_attention"] = i
    return found


def check_pair(drafter: Gemma4Assistant, target: CausalLM, where: str) -> None:
    """ValueError unless `drafter` can draft for `target`: a Gemma 4 target of the same width and vocabulary,
    with a K/V-storing layer of each type the drafter reads, of the same head size and KV heads."""
    ac, cfg = drafter.assistant, target.config
    if cfg.family != "gemma4":
        raise ValueError(f"{where} is a Gemma 4 drafter, but the target is {cfg.architecture}: use --draft lookup")
    if ac.backbone_hidden_size != cfg.hidden_size:
        raise ValueError(
            f"{where} was made for a target of hidden size {ac.backbone_hidden_size}, but this target's is "
            f"{cfg.hidden_size}: use the -assistant drafter of this model size"
        )
    if ac.text.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"{where} has a vocabulary of {ac.text.vocab_size} tokens, the target {cfg.vocab_size}: "
            "use the -assistant drafter made for this model"
        )
    found = producers(target)
    for i, (kind, spec) in enumerate(zip(ac.types, ac.text.layers)):
        if kind not in found:
            raise ValueError(f"{where}: drafter layer {i} reads a {kind} layer, but the target has none")
        theirs = cfg.layers[found[kind]]
        if (spec.head_dim, spec.num_kv_heads) != (theirs.head_dim, theirs.num_kv_heads):
            raise ValueError(
                f"{where}: drafter layer {i} ({kind}) expects K/V of {spec.num_kv_heads} heads of size "
                f"{spec.head_dim}, the target's layer {found[kind]} has {theirs.num_kv_heads} of size "
                f"{theirs.head_dim}: use the -assistant drafter made for this model"
            )


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class MTPDrafter:
    """Drafter (engine/speculative.py) for a Gemma 4 target with its -assistant drafter. `bind(cache)` gives the
    copy an engine uses: it reads that engine's paged cache."""

    reads_hidden = True  # the runner keeps each sequence's target hidden states (Sequence.hidden)

    def __init__(self, drafter: Gemma4Assistant, target: CausalLM, cache: PagedKVCache | None = None):
        self.drafter, self.target, self.cache = drafter, target, cache
        self.layers = producers(target)
        # What drafting one token costs next to a plain decode step (speculative.Adaptive's credit): decode reads
        # every weight once, so the drafter's bytes over the target's (the demo's: 0.12; E4B's: about 0.02).
        self.cost_per_token = _bytes(drafter) / max(1, _bytes(target))

    def bind(self, cache: PagedKVCache) -> MTPDrafter:
        return MTPDrafter(self.drafter, self.target, cache)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        assert self.cache is not None, "MTPDrafter.propose before bind(cache)"
        ready = [i for i, s in enumerate(seqs) if _hidden_row(s) is not None]
        out: list[list[int]] = [[] for _ in seqs]
        if not ready:
            return out
        rows = [seqs[i] for i in ready]
        with torch.inference_mode():
            device = self.target.device
            hidden = self.target.norm(torch.stack([_hidden_row(s) for s in rows]))
            last = torch.tensor([s.tokens[-1] for s in rows], device=device)
            positions = torch.tensor([s.num_computed for s in rows], device=device)
            kv = TargetKV({kind: self._kv(kind, rows) for kind in set(self.drafter.assistant.types)},
                          self.drafter.assistant.types)  # fmt: skip
            drafts = self.drafter.draft(self.target, last, hidden, positions, kv, max(ks[i] for i in ready))
        for i, draft in zip(ready, drafts.tolist()):
            out[i] = draft[: ks[i]]
        return out

    def _kv(self, kind: str, seqs: list[Sequence]) -> PagedKV:
        """The target's K/V of the layer `kind` reads, in its paged cache: each sequence's positions it sees (up to
        the last computed) as slots, padded to the longest with a masked repeat."""
        layer = self.layers[kind]
        window = self.target.config.layers[layer].sliding_window
        spans = [self._span(s, window, kind) for s in seqs]
        S = max(hi - lo for lo, hi in spans)
        bs, device, ar = self.cache.block_size, self.target.device, torch.arange(S)
        slots, valid = [], []
        for seq, (lo, hi) in zip(seqs, spans):
            first = lo // bs
            blocks = torch.tensor(seq.tables[window][first : (hi - 1) // bs + 1])
            pos = (lo + ar).clamp(max=hi - 1)  # padding repeats the last key (masked)
            slots.append(blocks[pos // bs - first] * bs + pos % bs)
            valid.append(lo + ar < hi)
        mask = torch.stack(valid)
        mask = None if bool(mask.all()) else mask.to(device)
        return PagedKV(self.cache.k[layer], self.cache.v[layer], torch.cat(slots).to(device), S, mask)

    def _span(self, seq: Sequence, window: int | None, kind: str) -> tuple[int, int]:
        """[lo, hi): the positions whose K/V the drafter reads for `seq` (hi: its computed positions)."""
        hi = seq.num_computed
        if kind == "full_attention":
            return 0, hi
        lo = max(0, hi - 1 - self._window())
        table = seq.tables[window]
        while table[lo // self.cache.block_size] is None:  # released by the sliding window: read what is held
            lo = (lo // self.cache.block_size + 1) * self.cache.block_size
        return lo, hi

    def _window(self) -> int:
        return next(s.sliding_window for s in self.drafter.assistant.text.layers if s.sliding_window)


def _hidden_row(seq: Sequence) -> torch.Tensor | None:
    """The target's (pre-norm) hidden state at the position before `seq`'s last token, if the runner kept it."""
    if seq.hidden is None or seq.num_computed != len(seq.tokens) - 1:
        return None
    first, rows = seq.hidden
    at = seq.num_computed - 1 - first
    return rows[at] if 0 <= at < len(rows) else None


def find_assistant(target: Path) -> Path | None:
    """The -assistant drafter stored beside a target folder ("<name>-assistant", as `hearth pull --with-draft`
    puts google/gemma-4-E2B-it-assistant beside google/gemma-4-E2B-it, and as the demo ships
    hearth-demo-assistant beside hearth-demo), or None. A drafter whose pull did not finish is skipped, with a
    warning that says how to finish it."""
    target = Path(target)
    if not target.is_dir():
        return None
    want = f"{target.name}{DRAFT_SUFFIX}".lower()
    for folder in target.parent.iterdir():
        if folder.name.lower() == want and (folder / "config.json").is_file():
            meta = folder / META
            if meta.is_file() and not json.loads(meta.read_text()).get("complete", True):
                repo = json.loads(meta.read_text()).get("repo_id", folder.name)
                log.warning("the pull of the drafter %s did not finish: run `hearth pull %s` again", repo, repo)
                return None
            return folder
    return None


def mtp_drafter(draft: str | Path, llm) -> MTPDrafter | None:
    """The MTP drafter `draft` names for `llm`'s model: a drafter folder, or "auto" (the one beside the model in
    the store; None, with a warning, when there is none)."""
    if draft == "auto":
        found = find_assistant(llm.path)
        if found is None:
            log.warning("no %s-assistant drafter beside %s: drafting by prompt lookup", llm.path.name, llm.path)
            return None
        draft = found
    folder = Path(draft).expanduser()
    drafter = load_assistant(folder, llm.dtype, llm.device)
    check_pair(drafter, llm.model, str(folder))
    return MTPDrafter(drafter, llm.model)
