"""The public Python API: LLM, SamplingParams, Completion."""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat_formats import detect
from .distributed.mesh import Mesh
from .embeddings.embedder import Embedder
from .engine.engine import Engine
from .engine.errors import ContextLengthError
from .engine.kv_cache import ContiguousKVCache, cache_layers
from .engine.runner import forward_tokens
from .engine.sampler import SamplingParams
from .engine.speculative import Drafter, make_drafter
from .kernels import cpu
from .moe import MoEStats, options, parse_budget, profile
from .moe.options import PrivacyOptions
from .multimodal.prompt import MediaOptions, MediaPrompt, expand, media_parts, preprocess
from .multimodal.spec import default_image_tokens, media_spec
from .multimodal.towers import tower_quant
from .quant.quantize import parse_quant
from .store import resolve
from .tokenizer import Tokenizer
from .weights.gguf import GGUFFile
from .weights.loader import load_model, stored_quant

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: Usage


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on every device. On CPU, measured (README, "Speed"): bf16 and fp16 decode equally fast through
    the GEMV kernel and 1.6-2x faster than fp32; bf16 keeps the exponent range Gemma's activations need."""
    return torch.bfloat16


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, else HEARTHLM_DEVICE, else the CPU; a device this machine lacks is refused here, before loading."""
    asked = device if device is not None else os.environ.get("HEARTHLM_DEVICE") or "cpu"
    try:
        dev = torch.device(asked)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device '{asked}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{asked}' was asked for, but this torch ({torch.__version__}) sees no CUDA GPU: install a CUDA "
                "build of torch where there is one, or use --device cpu (HEARTHLM_DEVICE=cpu)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device '{asked}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device '{asked}' is not supported; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16")
    return _DTYPES[dtype]


def _tokenizer(path: Path, gguf: GGUFFile | None) -> Tokenizer | None:
    """The model's tokenizer: from a GGUF file's metadata, or a folder's tokenizer.json; None if it has none."""
    if gguf is not None:
        from .gguf_tokenizer import tokenizer_from_gguf

        meta = gguf.metadata
        return tokenizer_from_gguf(meta, str(path)) if "tokenizer.ggml.model" in meta else None
    return Tokenizer(path) if (path / "tokenizer.json").exists() else None


class LLM:
    """A loaded model: `LLM("path/to/checkpoint")`, then `.generate(...)`, `.chat(...)` or `.logits(...)`."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        quant: str | None = None,
        expert_budget: str | float | None = None,
        moe_profile: bool = True,
        mmproj: str | Path | None = None,
        draft: str | Drafter | None = None,
        privacy: PrivacyOptions | None = None,
        quant_towers: bool = False,
        mesh: Mesh | None = None,
    ):
        """`expert_budget`: keep MoE experts in the checkpoint and at most this many in memory: bytes ('6GB',
        '512MB') or a fraction of all expert bytes (0.25, '25%'); `moe_profile`: seed the expert policy from
        the model's moe_profile.json (`hearth moe-profile`) when there is one; `mmproj`: a GGUF model's image /
        audio towers, llama.cpp's mmproj file (default: the one beside the model file, if any); `draft`: speculative
        decoding for the engine's requests, "lookup" (prompt lookup; lossless), the folder of a Gemma 4 -assistant
        drafter, "auto" (the -assistant drafter stored beside the model, else lookup) or None (off); a request's
        SamplingParams.speculative overrides it; `privacy`: the routing-privacy switches under an
        expert budget (moe/options.py; None: none; `hearth run/serve` pass PrivacyOptions(), whose private reads
        are "auto"). `privacy_note` then says what was chosen; `quant_towers`: quantize the vision / audio towers' linear
        layers too, in the text model's format (`quant`, or that of a folder `hearth quantize` wrote; without it the
        towers keep their precision); `tower_quant` then names it; `mesh`: load as one rank of a model split over
        several processes (distributed/): only the rank's share is kept, layer by layer as it loads, and every rank
        must then make the same calls in the same order."""
        make_drafter(draft)  # an unknown name fails here, before the weights load
        self.draft = draft
        spec = parse_quant(quant) if quant is not None else None
        budget = parse_budget(expert_budget) if expert_budget is not None else None
        options.check(privacy, budget)  # a switch with no pool to act on fails before the load
        path = resolve(model)  # None: the built-in demo; HF id / short name: its folder in the store
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path = path
        self._engine: Engine | None = None
        self._embedder: Embedder | None = None
        self._calls = itertools.count()
        if self.device.type == "cpu":  # build the CPU kernels now (first run only), not inside the first prompt
            cpu.available()
            cpu.avx512_gemm_available()  # the AVX-512 GEMM's extension, where the CPU takes it
        gguf = GGUFFile(path) if path.suffix == ".gguf" else None  # read once: weights and tokenizer
        # Image / audio input (Gemma 4 checkpoints with towers); the towers load on first use.
        self.media_spec = media_spec(path, Path(mmproj) if mmproj is not None else None)
        # bad combinations of quant_towers fail here, before the weights load
        self.tower_quant = tower_quant(quant_towers, path, self.media_spec, spec)
        self._media_encoder = None
        prior = profile.load_prior(path) if budget is not None and moe_profile else None
        share = None
        if mesh is not None:
            from .distributed.experts import rank_budget
            from .distributed.tensor_parallel import rank_load

            budget, share = rank_budget(budget, mesh), rank_load(mesh)
        self.model = load_model(gguf or path, self.dtype, self.device, spec, budget, prior, share)
        self.privacy = privacy if budget is not None else None
        self.privacy_note = options.apply(self.model, privacy, path) if self.privacy is not None else None
        self.quant = spec.name if spec else stored_quant(path) or ("gguf" if path.suffix == ".gguf" else None)
        self.config = self.model.config
        if mesh is not None:
            from .distributed.tensor_parallel import shard_llm

            shard_llm(self, mesh)  # the embedding, head and what waited for the whole model
        if isinstance(draft, (str, Path)) and draft not in ("lookup", "off"):
            self.draft = make_drafter(draft, self)  # a drafter folder or "auto": loaded and checked against the model
        self.tokenizer = _tokenizer(path, gguf)
        if not self.can_generate:
            self._embedder = Embedder(self.model, self.tokenizer, path)  # its heads: a broken folder fails at load

    def moe_stats(self) -> MoEStats | None:
        """Expert-residency totals since load (aggregate counters only), None without an expert budget."""
        pool = getattr(self.model, "expert_pool", None)
        return pool.snapshot() if pool is not None else None

    # -- inputs -------------------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) > self.config.max_position:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens is longer than the model's context ({self.config.max_position})"
            )
        return list(ids)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            prompt = self._need_tokenizer("text prompts").encode(prompt)
        return self._check_ids(prompt)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json, which {what} need; pass token ids instead")
        return self.tokenizer

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end a completion: the model's eos ids and the tokenizer's end-of-turn tokens."""
        eos = set(self.config.eos_token_ids)
        return self.tokenizer.stop_token_ids(eos) if self.tokenizer is not None else eos

    # -- media --------------------------------------------------------------------------------
    @property
    def modalities(self) -> set[str]:
        """The inputs this model takes: {"text"}, plus "image" and "audio" for a checkpoint with those towers."""
        return self.media_spec.modalities if self.media_spec is not None else {"text"}

    @property
    def media_encoder(self):
        """The towers and their output cache (multimodal/encoder.py); the tower weights load on first encode."""
        if self.media_spec is None:
            raise ValueError(f"{self.path.name} is a text-only model: it takes no image or audio input")
        if self._media_encoder is None:
            from .multimodal.encoder import MediaEncoder
            from .multimodal.towers import Towers

            self._media_encoder = MediaEncoder(Towers(self.media_spec, self.dtype, self.device, self.tower_quant))
        return self._media_encoder

    def media_prompt(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        image_tokens: int | None = None,
        max_pixels: int | None = None,
        **template_kwargs,
    ) -> MediaPrompt:
        """Render `messages` with the chat template (generation prompt added), decode and preprocess their image and
        audio parts, and expand each placeholder into its soft tokens. `image_tokens`: the soft-token budget per
        image (70, 140, 280 (default), 560, 1120); `max_pixels`: larger images are refused. The result goes to
        generate([...]) or logits(messages=...); bad media raise multimodal.MediaError (a ValueError)."""
        options = MediaOptions()
        if image_tokens is None:  # the budget the checkpoint's processor was saved with, if it records one
            image_tokens = default_image_tokens(self.path)
        if image_tokens is not None:
            options.image_tokens = image_tokens
        if max_pixels is not None:
            options.max_pixels = max_pixels
        items = [preprocess(p, options, self.media_spec, self.path.name) for p in media_parts(messages)]
        tok = self._need_tokenizer("chat messages")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **template_kwargs)
        ids = tok.encode_chat(text)
        if not items:
            return MediaPrompt(self._check_ids(ids), [], [])
        prompt = expand(ids, items, self.media_spec)
        self._check_ids(prompt.ids)
        return prompt

    def _splice(self, prompt: MediaPrompt, start: int, length: int):
        """The media embeddings of positions [start, start + length) of `prompt`, its items encoded first."""
        from .multimodal.splice import splice_for

        if not prompt.spans:
            return None
        self.media_encoder.encode([prompt], [(start, start + length)])
        return splice_for(prompt, start, length, self.media_spec.pad_id, self.device)

    # -- embeddings ---------------------------------------------------------------------------
    @property
    def can_generate(self) -> bool:
        """False for a dedicated embedding model (EmbeddingGemma, Qwen3-Embedding, ...): it only embeds."""
        return self.config.pooling is None

    @property
    def can_embed(self) -> bool:
        """Every loaded model embeds: dedicated embedding models, and language models by last-token pooling."""
        return True

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.model, self.tokenizer, self.path if self.path.is_dir() else None)
        return self._embedder

    @property
    def embedding_dims(self) -> int:
        """The native size of embed()'s vectors."""
        return self.embedder.dims

    @property
    def embedding_dimensions(self) -> tuple[int, ...] | range:
        """The sizes `dimensions=` accepts: the native size and the Matryoshka sizes the model was trained for, or
        any size from 1 (first components, renormalised) where none are known."""
        return self.embedder.allowed

    @property
    def pooling(self) -> str:
        """How token states become one vector: "mean", "last" (language models) or "cls"."""
        return self.embedder.pooling

    @property
    def embedding_max_tokens(self) -> int:
        """The most tokens one input may have; longer ones are cut (truncate=True) or refused."""
        return self.embedder.max_tokens

    def embed_tokens(self, text: str) -> list[int]:
        """`text` as embed() tokenizes it: the tokenizer's special tokens, plus the end-of-text token that a
        last-token embedding model (Qwen3-Embedding) reads."""
        return self.embedder.tokens(text)

    def embed_inputs(self, inputs: str | list[str] | list[list[int]], truncate: bool = True) -> list[list[int]]:
        """The token rows embed() runs: texts tokenized, token-id lists checked, each cut to embedding_max_tokens
        (`truncate`) or refused with a ValueError naming the input, its length and the limit."""
        return self.embedder.rows(inputs, truncate)

    def embed_ids(
        self, batch: list[list[int]], dimensions: int | None = None, *, truncate: bool = True
    ) -> torch.Tensor:
        """Token rows -> [n, d] float32 unit vectors, all rows in one batched forward (padded, masked)."""
        return self.embedder.vectors(self.embedder.rows(batch, truncate), dimensions)

    def embed(
        self, texts: str | list[str] | list[list[int]], *, dimensions: int | None = None, truncate: bool = True
    ) -> list[list[float]]:
        """One pooled, L2-normalised vector per input (text or token ids). `dimensions`: keep the first n components
        and renormalise (one of embedding_dimensions); `truncate`: cut inputs longer than embedding_max_tokens,
        or raise a ValueError."""
        self.embedder.check_dimensions(dimensions)
        return self.embedder.vectors(self.embed_inputs(texts, truncate), dimensions).tolist()

    def _need_generative(self) -> None:
        if not self.can_generate:
            raise ValueError(
                f"{self.path.name} is an embedding model ({self.config.architecture}, {self.pooling} pooling): it "
                "computes embeddings (embed) and cannot generate text or logits"
            )

    # -- scoring ------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(
        self, token_ids: list[int] | list[list[int]] | None = None, *, messages: list[dict] | None = None, **options
    ) -> torch.Tensor:
        """Full forward without a cache: [T, vocab] float32 for one sequence, [B, T, vocab] for a batch
        of equal-length sequences. `messages`: score a conversation instead, rendered with the chat template and
        its generation prompt, with image / audio content parts (see media_prompt, which takes `options`)."""
        self._need_generative()
        if messages is not None:
            if token_ids is not None:
                raise ValueError("logits() takes token_ids or messages, not both")
            return self._media_logits(self.media_prompt(messages, **options))
        if token_ids is None:
            raise ValueError("logits() needs token_ids or messages")
        single = bool(token_ids) and isinstance(token_ids[0], int)
        rows = [self._check_ids(token_ids)] if single else [self._check_ids(r) for r in token_ids]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("logits() takes one sequence or a batch of sequences of equal length")
        ids = torch.tensor(rows, device=self.device)
        B, T = ids.shape
        cache = ContiguousKVCache(cache_layers(self.model, self.config.layers), B, T, self.dtype, self.device)
        h = forward_tokens(self.model, cache, ids, torch.zeros(B, dtype=torch.long, device=self.device))
        out = self.model.logits(h)
        return out[0] if single else out

    def _media_logits(self, prompt: MediaPrompt) -> torch.Tensor:
        T = len(prompt.ids)
        ids = torch.tensor([prompt.ids], device=self.device)
        cache = ContiguousKVCache(cache_layers(self.model, self.config.layers), 1, T, self.dtype, self.device)
        start = torch.zeros(1, dtype=torch.long, device=self.device)
        h = forward_tokens(self.model, cache, ids, start, splice=self._splice(prompt, 0, T))
        return self.model.logits(h)[0]

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str] | list[list[int]] | list[int] | list[MediaPrompt],
        params: SamplingParams | None = None,
        on_token=None,
    ) -> list[Completion]:
        """Generate a completion per prompt (text, token ids, or a media_prompt()), all of them batched on the
        engine. `on_token(index, token_id)` is called as each token is produced, for streaming."""
        self._need_generative()
        params = params or SamplingParams()
        if isinstance(prompts, (str, MediaPrompt)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        media = [p if isinstance(p, MediaPrompt) and p.spans else None for p in prompts]
        ids = [self._check_ids(p.ids) if isinstance(p, MediaPrompt) else self._encode(p) for p in prompts]
        if not ids:
            return []
        engine = self.engine()
        tag = f"generate-{next(self._calls)}"
        index = {f"{tag}-{i}": i for i in range(len(ids))}
        tokens: list[list[int]] = [[] for _ in ids]
        texts: list[list[str]] = [[] for _ in ids]
        reasons: list[str | None] = [None] * len(ids)
        try:
            for rid, i in index.items():
                if media[i] is not None:
                    engine.add_request(rid, ids[i], params, media=media[i])
                else:
                    engine.add_request(rid, ids[i], params)
            while any(r is None for r in reasons):
                for out in engine.step():
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    tokens[i] += out.token_ids
                    texts[i].append(out.text)
                    if on_token:
                        for t in out.token_ids:
                            on_token(i, t)
                    if out.finished:
                        reasons[i] = out.finish_reason
        finally:  # an exception (Ctrl-C in `hearth run`) must not leave requests holding the cache
            for rid, i in index.items():
                if reasons[i] is None:
                    engine.abort(rid)
        return [
            Completion("".join(texts[i]), tokens[i], reasons[i], Usage(len(ids[i]), len(tokens[i])))
            for i in range(len(ids))
        ]

    def engine(self, **options) -> Engine:
        """The engine generate() and chat() run on: created on first use with default sizes, or anew from
        `options`, Engine's keywords (max_running, block_size, kv_blocks, prefill_chunk, prefix_caching, draft,
        adaptive)."""
        self._need_generative()
        if self._engine is None or options:
            self._engine = Engine(self, **options)
        return self._engine

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        tools: list[dict] | None = None,
        on_token=None,
        **template_kwargs,
    ) -> Completion:
        """Answer a conversation (`[{"role": "user", "content": "..."}, ...]`) rendered with the model's chat
        template; `tools` (JSON schemas) and keywords such as `enable_thinking=True` reach the template.
        Generation ends at the model's end-of-turn token. `on_token(0, token_id)` streams as in generate().
        Content may be a list of parts: text, and image / audio parts (see media_prompt; its `image_tokens` and
        `max_pixels` keywords apply here too)."""
        tok = self._need_tokenizer("chat messages")
        media = {k: template_kwargs.pop(k) for k in ("image_tokens", "max_pixels") if k in template_kwargs}
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **template_kwargs)
        if params is not None and params.constrained and params.reasoning is None:
            fmt = detect(tok.chat_template(with_tools=True))
            if fmt.think:  # a reasoning model reasons first, unconstrained; the constraint holds its answer
                params = dataclasses.replace(params, reasoning=fmt.think, in_reasoning=fmt.opens_reasoning(text))
        if media_parts(messages):
            prompt = self.media_prompt(messages, tools=tools, **media, **template_kwargs)
            return self.generate([prompt], params, on_token=on_token)[0]
        return self.generate([tok.encode_chat(text)], params, on_token=on_token)[0]
