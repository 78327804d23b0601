"""One request's state inside the engine: its tokens, how many of them the KV cache holds, its block tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .detokenize import TextStream
from .guided import Guide
from .sampler import SamplingParams

if TYPE_CHECKING:
    from ..multimodal.prompt import MediaPrompt
    from .speculative import SpecState


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator | None
    max_len: int  # the sequence ends ("length") when prompt + output reaches this
    order: int = 0  # admission order: the youngest is preempted first
    output: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose K/V are in the cache
    tables: dict[int | None, list[int | None]] = field(default_factory=dict)  # window -> block per index
    hashes: list[bytes] = field(default_factory=list)  # content hash of each full block of `tokens`
    registered: int = 0  # full blocks already offered to the prefix cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False  # admitted at least once (cached_tokens is then final)
    finish_reason: str | None = None
    guide: Guide | None = None  # constrained decoding: masks each step's logits
    media: MediaPrompt | None = None  # image / audio items of the prompt and where their soft tokens sit
    spec: SpecState | None = None  # speculative decoding: this sequence drafts (engine/speculative.py)
    draft: list[int] = field(default_factory=list)  # the draft proposed for the next step, verified with it
    # (first position, target hidden states [n, H] from there) of the last forward that sampled from this sequence,
    # kept for drafters that read them (engine/mtp.py)
    hidden: tuple[int, torch.Tensor] | None = None
    client: str | None = None  # who asked (server/clients.py): an isolating scheduler runs one client at a time
    cache_salt: bytes = b""  # seeds the prefix-cache keys: an isolating engine gives each client its own

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def pending(self) -> int:
        """Tokens whose K/V still have to be computed before the next token can be sampled."""
        return len(self.tokens) - self.num_computed
