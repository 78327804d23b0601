"""The serving engine: requests in, a step at a time (schedule -> run -> sample -> emit), outputs out.

Used synchronously (`add_request`, then `step()` until `has_unfinished()` is False) by LLM.generate, and
from a background thread by AsyncEngine for the server. `add_request` and `abort` may be called from
other threads than the one calling `step`.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels import cpu
from .block_manager import BlockManager
from .detokenize import TextStream
from .errors import ContextLengthError
from .guided import Guides
from .kv_cache import cache_layers
from .paged_cache import PagedKVCache
from .runner import packs, run_paged, run_verify
from .sampler import SamplingParams, TokenLogprob, greedy_rows, logprob_of, logprob_rows, penalize, pick
from .scheduler import Scheduler, Work
from .sequence import Sequence
from .speculative import Adaptive, Drafter, SpecState, judge, make_drafter

log = logging.getLogger("hearthlm.engine")

if TYPE_CHECKING:
    from ..api import LLM
    from ..multimodal.prompt import MediaPrompt

__all__ = ["Engine", "EngineStats", "RequestOutput", "TokenLogprob"]

# With kv_blocks=None the full-attention pool holds max_running full contexts, but at most this many bytes
# (and at least one full context). Memory is only touched when blocks are first used.
DEFAULT_KV_BYTES = 2 * 2**30
# With max_running=None, the most sequences that run at once: as many as the KV cache holds (each needs at least
# one block; a request is admitted only when its first chunk's blocks are free), up to this many. It bounds the
# sliding-window pools, which are sized to hold every running sequence's window.
MAX_RUNNING = 256
_FROM_LLM = object()  # Engine(draft=...) not given: the LLM's choice (LLM(..., draft=...))


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]  # new tokens this step (never the EOS / stop token itself)
    text: str  # new text this step (held back while it may begin a stop string; never the stop string)
    logprobs: list[TokenLogprob] | None  # one per token in token_ids when params.logprobs is not None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (skipped prefill)
    progress: tuple[int, int] | None = None  # (prompt tokens computed, prompt tokens) after a prefill chunk
    error: str | None = None  # set with finish_reason "error": picking this request's token failed


class _Taken:
    """The tokens one step gives one request (several after a speculative step), their text and logprobs."""

    tokens: list[int]
    text: str
    logprobs: list[TokenLogprob] | None

    def __init__(self, logprobs: bool):
        self.tokens, self.text, self.logprobs = [], "", [] if logprobs else None


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_total: int  # blocks in all pools (one pool per attention window)
    kv_blocks_used: int  # blocks referenced by requests; blocks kept only by the prefix cache count as free
    block_size: int
    prefix_hit_tokens: int
    prompt_tokens: int
    generated_tokens: int
    preemptions: int
    drafted_tokens: int = 0  # speculative decoding: draft tokens verified
    accepted_tokens: int = 0  # of those, kept
    draft_steps: int = 0  # verify forwards' rows (one per sequence and step that had a draft)
    kv_bytes_reserved: int = 0  # the KV pools' size; memory the OS gives only once a block is first written
    kv_bytes_resident: int = 0  # the blocks written at least once: what the KV cache adds to the process's RSS


class Engine:
    """Continuous batching over a paged KV cache with prefix caching, for one loaded LLM."""

    def __init__(
        self,
        llm: LLM,
        *,
        max_running: int | None = None,
        block_size: int = 16,
        kv_blocks: int | None = None,
        prefill_chunk: int = 512,
        prefix_caching: bool = True,
        draft: str | Drafter | None = _FROM_LLM,  # type: ignore[assignment]
        adaptive: Adaptive | None = None,
        isolate_clients: bool | None = None,
    ):
        """max_running: the most requests that run (decode or prefill) at once; past it, and past what the KV
        cache holds, requests wait in order. None: what the KV cache holds, at most MAX_RUNNING.
        draft: speculative decoding for requests that do not say (SamplingParams.speculative): "lookup" (prompt
        lookup), None / "off", "auto" or a Gemma 4 -assistant drafter folder (engine/mtp.py), or a Drafter;
        default: the LLM's `draft`. adaptive: its draft-length policy. isolate_clients: one client's requests per
        step, the expert pool reset when the client changes (scheduler.py; default: the LLM's privacy options)."""
        for name, value in [("block_size", block_size), ("prefill_chunk", prefill_chunk)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name} must be an integer >= 1, got {value!r}")
        for name, value in [("max_running", max_running), ("kv_blocks", kv_blocks)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Engine: {name} must be None (automatic) or an integer >= 1, got {value!r}")
        self.llm = llm
        self.config = llm.config
        self.block_size, self.prefill_chunk = block_size, prefill_chunk
        self.context = self.config.max_position
        sizes = self._pool_sizes(max_running or MAX_RUNNING, kv_blocks)
        self.cache = PagedKVCache(cache_layers(llm.model, self.config.layers), sizes, block_size, llm.dtype, llm.device)
        self.blocks = BlockManager(sizes, block_size, prefix_caching)
        # Every running sequence holds at least one block of each pool.
        self.max_running = max_running or min(MAX_RUNNING, *sizes.values())
        self.scheduler = Scheduler(self.blocks, self.max_running, prefill_chunk)
        self._isolate(llm, isolate_clients)
        self._lock = threading.RLock()  # held by step() and abort()
        self._inbox_lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}  # unfinished, by id
        self._outbox: list[RequestOutput] = []  # abort outputs, returned by the next step()
        self._prompt_tokens = self._generated_tokens = 0
        self._guide_state: Guides | None = None
        self._guides_lock = threading.Lock()
        self.drafter = make_drafter(getattr(llm, "draft", None) if draft is _FROM_LLM else draft, llm)
        if callable(getattr(self.drafter, "bind", None)):  # a model drafter reads this engine's KV cache
            self.drafter = self.drafter.bind(self.cache)
        self.adaptive = adaptive or Adaptive()
        self._lookup: Drafter | None = None  # for requests that ask to draft on an engine that does not
        self._drafted = self._accepted = self._draft_steps = 0
        on_cpu = llm.model.device.type == "cpu" and cpu.available()
        self._row_cap = cpu.verify_rows() if on_cpu and self.adaptive.fit_rows else None  # see _fit_rows

    def _isolate(self, llm: LLM, isolate: bool | None) -> None:
        """Client isolation (A3, docs/privacy.md): the scheduler gives the steps to one client at a time, the
        expert pool goes back to its state at load whenever the client changes, and each client's prompts find
        only its own blocks in the prefix cache (a hit would tell one client another's prompt)."""
        if isolate is None:
            isolate = bool(getattr(getattr(llm, "privacy", None), "isolate_clients", False))
        self.isolating = isolate
        pool = getattr(llm.model, "expert_pool", None)
        if isolate and pool is None:
            raise ValueError("isolate_clients acts on the expert pool, which exists only under an expert budget")
        if isolate:
            from ..moe.private import reset

            self.scheduler.isolate(lambda: reset(pool))

    def _pool_sizes(self, running: int, kv_blocks: int | None) -> dict[int | None, int]:
        bs, layers = self.block_size, self.config.layers
        per_context = math.ceil(self.context / bs)
        sizes: dict[int | None, int] = {}
        for w in PagedKVCache.pool_windows(layers):
            if w is None:
                token_bytes = sum(
                    2 * s.num_kv_heads * s.head_dim * self.llm.dtype.itemsize
                    for s in layers
                    if s.kv_source is None and s.sliding_window is None
                )
                cap = max(per_context, DEFAULT_KV_BYTES // (token_bytes * bs))
                sizes[w] = kv_blocks or min(running * per_context, cap)
            else:
                # A decoding row reads one window; one prefill chunk at a time reads a window more. Twice that
                # leaves room for the prefix cache to keep recent windows.
                need = running * (math.ceil(w / bs) + 1) + math.ceil((w + self.prefill_chunk) / bs) + 1
                sizes[w] = min(kv_blocks or 2 * need, 2 * need, per_context * running)
        return sizes

    # -- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        media: MediaPrompt | None = None,
        client: str | None = None,
    ) -> None:
        """Queue a request; invalid input raises ValueError (ContextLengthError for a too-long prompt) now.
        `media`: the prompt's images / audio (LLM.media_prompt; `prompt` is its ids), encoded when first needed;
        `client`: who asked, for an engine that isolates clients (`isolate_clients`)."""
        prompt = self._validate(request_id, prompt, params)
        if media is not None and media.ids != prompt:
            raise ValueError("add_request: `media` belongs to another prompt (pass media.ids as the prompt)")
        if media is not None and media.spans and self.llm.media_spec is None:
            raise ValueError(f"{self.llm.path.name} is a text-only model: it takes no image or audio input")
        tok = self.llm.tokenizer
        max_len = min(self.context, len(prompt) + params.max_tokens)
        if None in self.blocks.pools:
            max_len = min(max_len, self.blocks.pools[None].num_blocks * self.block_size)
        stream = TextStream(tok if params.detokenize or params.stop else None, params.stop)
        seq = Sequence(request_id, prompt, params, stream, params.generator(), max_len)
        seq.guide = self._guides().guide(params) if params.constrained else None
        drafter = self._drafter_for(params)
        seq.spec = SpecState(drafter, self.adaptive) if drafter is not None else None
        seq.media = media if media is not None and media.spans else None
        seq.client = client
        if self.isolating:
            seq.cache_salt = (client or "").encode()
        with self._inbox_lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
            self._requests[request_id] = seq
            self._inbox.append(seq)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.config.vocab_size
        prompt = list(prompt)
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab}): pass ids from this model")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(prompt) + 1 > self.context:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens leaves no room to generate in the model's context of "
                f"{self.context} tokens: shorten it to at most {self.context - 1} tokens"
            )
        if params.stop and self.llm.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json in the model folder; use stop_token_ids instead")
        for w, pool in self.blocks.pools.items():
            need = math.ceil((len(prompt) + 1) / self.block_size)
            if w is not None:
                need = min(need, math.ceil((w + self.prefill_chunk) / self.block_size) + 1)
            if need > pool.num_blocks:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens needs {need} KV blocks of {self.block_size} tokens but the "
                    f"cache has {pool.num_blocks}: create the Engine with a larger kv_blocks or shorten the prompt"
                )
        return prompt

    def _drafter_for(self, params: SamplingParams) -> Drafter | None:
        if params.speculative is False:
            return None
        if self.drafter is None and params.speculative:
            self._lookup = self._lookup or make_drafter("lookup")
            return self._lookup
        return self.drafter

    def prepare(self, params: SamplingParams) -> None:
        """Compile the constraint of `params` now (it is cached by its text), so that add_request finds it ready;
        raises GuideError for a bad one. Safe from any thread."""
        if params.constrained:
            self._guides().guide(params)

    def _guides(self) -> Guides:
        """The model's grammar machinery, built on the first constrained request."""
        with self._guides_lock:  # not the inbox lock: building the token tables can take seconds
            if self._guide_state is None:
                if self.llm.tokenizer is None:
                    raise ValueError(
                        "constrained decoding needs the model's tokenizer (tokenizer.json or GGUF vocabulary)"
                    )
                self._guide_state = Guides(self.llm.tokenizer, self.config.vocab_size, set(self.llm.stop_token_ids))
            return self._guide_state

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next step() returns its final output (reason "abort").
        Unknown or finished ids are ignored."""
        with self._lock:
            with self._inbox_lock:
                seq = self._requests.pop(request_id, None)
                if seq is None:
                    return
                if seq in self._inbox:
                    self._inbox.remove(seq)
            self.scheduler.finish(seq)
            seq.finish_reason = "abort"
            self._outbox.append(self._output(seq, [], "", [] if seq.params.logprobs is not None else None))

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._outbox)

    def stats(self) -> EngineStats:
        total, used = self.blocks.stats()
        s = self.scheduler
        per_block = {w: self.cache.block_bytes(w) for w in self.blocks.pools}
        return EngineStats(
            waiting=len(s.waiting) + len(self._inbox),
            running=len(s.running),
            kv_blocks_total=total,
            kv_blocks_used=used,
            block_size=self.block_size,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated_tokens,
            preemptions=s.preemptions,
            drafted_tokens=self._drafted,
            accepted_tokens=self._accepted,
            draft_steps=self._draft_steps,
            kv_bytes_reserved=sum(p.num_blocks * per_block[w] for w, p in self.blocks.pools.items()),
            kv_bytes_resident=sum(n * per_block[w] for w, n in self.blocks.touched().items()),
        )

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: admit, compute one chunk or token per scheduled request, sample, emit."""
        with self._lock:
            self._take_inbox()
            outputs, self._outbox = self._outbox, []
            self.scheduler.pick_client()
            self._propose()
            work = self.scheduler.schedule()
            for w, pool in self.blocks.pools.items():
                self.cache.zero(w, pool.take_fresh())
            checks = self._checks(work)
            checked = {id(w) for w in checks}
            due, logits = self._run([w for w in work if id(w) not in checked])
            verified = self._run_drafts(checks)
            # a chunk that leaves more of its prompt to compute: progress, for a request that asked
            outputs += [self._progress(w.seq) for w in work if w.n > 1 and w.seq.pending > 1 and w.seq.params.progress]
            if due:  # the plain greedy rows' tokens (and log-probabilities) in one batched op each
                tokens = greedy_rows(logits, [s.params for s in due], [s.guide for s in due])
                logprobs = logprob_rows(logits, tokens, [s.params.logprobs for s in due])
                outputs += [self._advance_alone(*row) for row in zip(due, logits, tokens, logprobs)]
            # what each drafting sequence's try costs in tokens (speculative.Adaptive): this step's rows share it
            share = len(verified) / max(1, sum(1 for _, _, draft in verified if draft))
            outputs += [self._verify_alone(*row, share) for row in verified]
            self.scheduler.after_step(work)
            return outputs

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for seq in inbox:
            self._prompt_tokens += len(seq.prompt)
            self.scheduler.add(seq)

    def _run(self, work: list[Work]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Forward every scheduled chunk; the sequences whose next token is due and their logits [n, V]."""
        model, due, rows = self.llm.model, [], []
        decode = [w.seq for w in work if w.n == 1]
        if decode:  # one forward: on CPU the fused decode step takes up to cpu.MAX_DECODE_ROWS rows whole
            wants = [s.pending == 1 for s in decode]
            logits = run_paged(model, self.cache, decode, 1, True)
            for seq in decode:
                seq.num_computed += 1
            due += [s for s, want in zip(decode, wants) if want]
            rows.append(logits if all(wants) else logits[torch.tensor(wants)])
        chunks = [w for w in work if w.n > 1 and not w.draft]
        media = [w for w in chunks if w.seq.media is not None]
        self._encode_media(media)
        for w in media:  # alone: its chunk may splice media in
            want = w.n == w.seq.pending
            splice = self._splice(w.seq, w.n)
            logits = run_paged(model, self.cache, [w.seq], w.n, want, splice) if splice else \
                run_paged(model, self.cache, [w.seq], w.n, want)  # fmt: skip
            w.seq.num_computed += w.n
            if want:
                due.append(w.seq)
                rows.append(logits)
        for pack in packs([w for w in chunks if w.seq.media is None]):
            seqs, wants = [w.seq for w in pack], [w.n == w.seq.pending for w in pack]
            logits = run_paged(model, self.cache, seqs, [w.n for w in pack], any(wants))
            for w in pack:
                w.seq.num_computed += w.n
            if any(wants):
                due += [s for s, want in zip(seqs, wants) if want]
                rows.append(logits if all(wants) else logits[torch.tensor(wants)])
        if not due:
            return [], None
        return due, rows[0] if len(rows) == 1 else torch.cat(rows)

    # -- speculative decoding (engine/speculative.py) -------------------------------------------------
    def _propose(self) -> None:
        """Ask each drafter for drafts for its running sequences that decode next (seq.draft; the scheduler
        verifies a draft where its slots are free)."""
        by_drafter: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in filter(self.scheduler.eligible, self.scheduler.running):
            seq.draft = []
            if seq.spec is not None and seq.pending == 1 and (k := seq.spec.budget(seq)) > 0:
                by_drafter.setdefault(id(seq.spec.drafter), []).append((seq, k))
        for rows in by_drafter.values():
            if getattr(rows[0][0].spec.drafter, "reads_hidden", False):
                rows = self._share_rows(rows)
            seqs, ks = [s for s, _ in rows], [k for _, k in rows]
            for seq, k, draft in zip(seqs, ks, seqs[0].spec.drafter.propose(seqs, ks) if seqs else []):
                seq.draft = list(draft[:k])
        self._fit_rows()

    def _share_rows(self, rows: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """A model drafter's budgets on CPU: the step's free rows (see _fit_rows) shared evenly. A model's draft
        tokens are worth less the further out they are, and drafting tokens that _fit_rows then trims is wasted
        work (a model drafter's, unlike prompt lookup's, costs a forward per token)."""
        if self._row_cap is None:
            return rows
        free = max(0, self._row_cap - sum(1 for s in self.scheduler.running if s.pending == 1))
        share, extra = divmod(free, len(rows))
        shared = [(seq, min(k, share + (i < extra))) for i, (seq, k) in enumerate(rows)]
        return [(seq, k) for seq, k in shared if k > 0]

    def _fit_rows(self) -> None:
        """On CPU a verify step is fastest as one fused decode forward in one pass over the weights (cpu.verify_rows()
        rows, one per position): trim the drafts, longest first, so that the step's decode rows and draft rows fit."""
        if self._row_cap is None:
            return
        decoding = [s for s in self.scheduler.running if s.pending == 1]
        free = self._row_cap - len(decoding)
        for seq in sorted((s for s in decoding if s.draft), key=lambda s: -len(s.draft)):
            seq.draft = seq.draft[: max(0, free)]
            free -= len(seq.draft)

    @staticmethod
    def _checks(work: list[Work]) -> list[Work]:
        """The work that verify forwards run: the drafting rows, and in a step with any, the other decode rows too
        (as drafts of no tokens), so that all of them share forwards."""
        if not any(w.draft for w in work):
            return []
        return [w for w in work if w.draft or (w.n == 1 and w.seq.pending == 1)]

    def _run_drafts(self, work: list[Work]) -> list[tuple[Sequence, torch.Tensor, list[int]]]:
        """The verify forwards: (sequence, logits [k + 1, V], draft) per row (k = 0 for a row without a draft)."""
        if not work:
            return []
        logits = run_verify(self.llm.model, self.cache, [w.seq for w in work], [w.draft for w in work])
        return [(w.seq, row, w.draft) for w, row in zip(work, logits)]

    def _verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int], share: float) -> RequestOutput:
        """Walk the verified positions in order: keep draft tokens while the target agrees (judge), then emit
        the target's own token; each kept token passes the same checks as a decoded one. Then roll the KV back
        to the kept tokens. `share`: the step's decode rows per sequence that drafted in it (the try's cost)."""
        p, start, taken = seq.params, seq.num_computed, _Taken(seq.params.logprobs is not None)
        plain = p.temperature == 0 and not p.penalized and seq.guide is None
        targets = logits.argmax(-1).tolist() if plain else None
        lps = logprob_rows(logits, targets, [p.logprobs] * len(targets)) if plain else None
        kept, reason = 0, None
        for i in range(len(draft) + 1):
            seq.num_computed = start + 1 + i  # the last token and the i kept draft tokens have their K/V
            row, lp = logits[i], lps[i] if lps else None
            if targets is not None:
                token = targets[i]
            else:
                row = self._process(seq, row)
                if row is None:
                    reason = "grammar"
                    break
                token = judge(row, draft[i], p, seq.generator) if i < len(draft) else pick(row, p, seq.generator)
            ok = i < len(draft) and token == draft[i]
            kept += ok
            reason = self._take(seq, token, row, lp, taken)
            if reason is not None or not ok:
                break
        if draft:
            seq.spec.record(seq, len(draft), kept, share)
            self._drafted, self._accepted, self._draft_steps = (
                self._drafted + len(draft), self._accepted + kept, self._draft_steps + 1
            )  # fmt: skip
        if reason is None:
            self.blocks.truncate(seq)
        return self._close(seq, reason, taken)

    def _verify_alone(self, seq: Sequence, logits: torch.Tensor, draft: list[int], share: float) -> RequestOutput:
        """_verify, where a failure ends this request alone (as _advance_alone)."""
        try:
            return self._verify(seq, logits, draft, share)
        except Exception as e:
            return self._failed(seq, e)

    def _encode_media(self, work: list[Work]) -> None:
        """Run the towers once for every image / clip that this step's chunks need and that is not encoded yet."""
        if work:
            ranges = [(w.seq.num_computed, w.seq.num_computed + w.n) for w in work]
            self.llm.media_encoder.encode([w.seq.media for w in work], ranges)

    def _splice(self, seq: Sequence, n: int):
        from ..multimodal.splice import splice_for

        return splice_for(seq.media, seq.num_computed, n, self.llm.media_spec.pad_id, self.llm.device)

    def _advance(
        self, seq: Sequence, logits: torch.Tensor, token: int | None, logprob: TokenLogprob | None
    ) -> RequestOutput:
        """Take the next token: `token` (and its `logprob`) when greedy_rows picked it, else one picked here from
        logits [V]."""
        taken = _Taken(seq.params.logprobs is not None)
        if token is None:
            logits = self._process(seq, logits)
            if logits is None:
                return self._close(seq, "grammar", taken)
            token = pick(logits, seq.params, seq.generator)
        return self._close(seq, self._take(seq, token, logits, logprob, taken), taken)

    def _process(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor | None:
        """logits [V] as the request picks from them: the grammar's mask, then the penalties over the tokens so
        far; None when the grammar allows no token at all."""
        if seq.guide is not None:
            logits = seq.guide.restrict(logits)
            if logits is None:
                return None
        if seq.params.penalized:
            logits = penalize(logits, seq.params, seq.tokens, seq.output)
        return logits

    def _take(
        self, seq: Sequence, token: int, logits: torch.Tensor, logprob: TokenLogprob | None, taken: _Taken
    ) -> str | None:
        """Append `token` to `seq` (and to `taken`); the finish reason it causes, None when the request goes on."""
        p = seq.params
        eos = () if p.ignore_eos else self.llm.stop_token_ids
        if token in eos or token in p.stop_token_ids:
            return "stop"
        seq.output.append(token)
        seq.tokens.append(token)
        self._generated_tokens += 1
        taken.tokens.append(token)
        taken.text += seq.stream.push(token)
        if taken.logprobs is not None:
            taken.logprobs.append(logprob or logprob_of(logits, token, p.logprobs))
        if seq.guide is not None and not seq.guide.accept(token):  # only an unmasked token could be refused
            return "grammar"
        if seq.stream.stopped or (seq.guide is not None and seq.guide.done):
            return "stop"
        if len(seq.output) >= p.max_tokens or len(seq.tokens) >= seq.max_len:
            return "length"
        return None

    def _close(self, seq: Sequence, reason: str | None, taken: _Taken) -> RequestOutput:
        """The step's output for `seq`: it goes on (reason None) or ends with `reason`."""
        if reason is None:
            return self._output(seq, taken.tokens, taken.text, taken.logprobs)
        taken.text += seq.stream.finish()  # the held-back tail may complete a stop string
        if reason == "length" and seq.stream.stopped:
            reason = "stop"
        return self._end(seq, reason, taken.tokens, taken.text, taken.logprobs)

    def _progress(self, seq: Sequence) -> RequestOutput:
        """A prompt's prefill so far, for a request that asked (SamplingParams.progress): no tokens yet."""
        n = len(seq.prompt)
        done = min(seq.num_computed, n)
        return RequestOutput(seq.request_id, [], "", None, False, None, n, 0, seq.cached_tokens, (done, n))

    def _advance_alone(self, seq: Sequence, logits: torch.Tensor, token: int | None, logprob) -> RequestOutput:
        """_advance, where a failure of this one row (its sampling parameters, its grammar) ends this request
        alone, with finish_reason "error", and the batch goes on."""
        try:
            return self._advance(seq, logits, token, logprob)
        except Exception as e:
            return self._failed(seq, e)

    def _failed(self, seq: Sequence, e: Exception) -> RequestOutput:
        log.exception("request %s failed while picking its token", seq.request_id)
        out = self._end(seq, "error", [], "", None)
        out.error = f"{type(e).__name__}: {e}"
        return out

    def _end(self, seq: Sequence, reason: str, new: list[int], text: str, logprobs) -> RequestOutput:
        """Finish `seq` with `reason` ("stop", "length", or "grammar": the constraint allows no token at all)."""
        seq.finish_reason = reason
        with self._inbox_lock:
            self._requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return self._output(seq, new, text, logprobs)

    def _output(self, seq: Sequence, new: list[int], text: str, logprobs: list[TokenLogprob] | None):
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=new,
            text=text,
            logprobs=logprobs,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            cached_tokens=seq.cached_tokens,
        )
