"""Generation on token ids: the `Engine` and the requests, sequences and events it works with.

The engine knows token ids only. A request (one prompt, n samples) is prefilled once, in chunks,
into its own cache, forked n ways and merged into the running batch; every `step()` samples one
token for each active row, retires finished rows (freeing their cache rows) and runs one batched
decode forward for the rest. New requests can join between steps, which is continuous batching:
the server drives `step()` from its scheduler, `generate()` and `stream()` drive it to completion.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from zaya.cache import Cache
from zaya.errors import ZayaError
from zaya.sampling import Constraint, SamplingParams, apply_penalties, fit_max_new_tokens, sample, token_logprobs
from zaya.tokenizer import IncrementalDecoder


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_index: int = 0
    index: int = 0
    prompt_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class TokenEvent:
    prompt_index: int
    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class Request:
    """One prompt and its sampling parameters; its n samples share one prefill and one generator."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, prompt_index: int = 0, tag=None):
        self.prompt_ids, self.params, self.prompt_index, self.tag = list(prompt_ids), params, prompt_index, tag
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
        self.sequences: list[Sequence] = []
        self.created = time.monotonic()

    @property
    def finished(self) -> bool:
        return all(s.finish_reason for s in self.sequences)


@dataclass
class Sequence:
    request: Request
    index: int
    decoder: object | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    constraint: Constraint | None = None

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), self.finish_reason or "length",
                          self.request.prompt_index, self.index, len(self.request.prompt_ids),
                          self.logprobs, self.top_logprobs)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def decode_threads() -> int:
    """Intra-op threads for decode steps: ``ZAYA_DECODE_THREADS`` (default 0 = torch's setting).

    A decode step is made of many small ops and every parallel region costs a thread wake-up.
    When the cores are shared with other busy processes that wake-up waits for a scheduler slice,
    which measured 10-30x slower decode with 2 threads than with 1 (docs/performance.md); set
    ``ZAYA_DECODE_THREADS=1`` on such machines. On an idle machine torch's default reads weights
    faster."""
    return int(os.environ.get("ZAYA_DECODE_THREADS", "0") or 0)


class _threads:
    def __init__(self, n: int, device: torch.device):
        self.n, self.old, self.cpu = n, None, device.type == "cpu"

    def __enter__(self):
        if self.n and self.cpu:
            self.old = torch.get_num_threads()
            if self.old != self.n:
                torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None and self.old != self.n:
            torch.set_num_threads(self.old)


class Engine:
    def __init__(self, model, tokenizer=None, *, max_context: int | None = None, prefill_chunk: int = 512,
                 threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.threads = decode_threads() if threads is None else threads
        self.config = model.config
        self.max_context = max_context or self.config.max_position_embeddings
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.dtype, self.device = param.dtype if param.is_floating_point() else torch.bfloat16, param.device
        self.eos_ids = set(self.config.eos_ids) | set(getattr(tokenizer, "eos_ids", ()) or ())
        self.rows: list[Sequence] = []
        self.cache: Cache | None = None
        self.logits: torch.Tensor | None = None  # (rows, V) float: the next-token logits of every row

    # -- admission ------------------------------------------------------------------------------
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len < 1:
            raise ZayaError("the prompt is empty")
        fit_max_new_tokens(prompt_len, self.max_context, params.max_new_tokens)

    @torch.inference_mode()
    def add(self, request: Request) -> list[Sequence]:
        ids, p = request.prompt_ids, request.params
        self.check(len(ids), p)
        vocab = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ZayaError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        cache = Cache(self.config, 1, len(ids) + p.max_new_tokens, dtype=self.dtype, device=self.device,
                      max_context=self.max_context)
        tokens = torch.tensor([ids], device=self.device)
        for start in range(0, len(ids), self.prefill_chunk):
            logits = self.model(tokens[:, start:start + self.prefill_chunk], cache=cache, last_only=True)
        logits = logits[:, -1].float()
        cache = cache.fork(p.n)
        seqs = [Sequence(request, i, self._decoder()) for i in range(p.n)]
        if p.uses_penalties:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seen[tokens[0]] = True
            for s in seqs:
                s.counts, s.seen = torch.zeros(vocab, device=self.device), seen.clone()
        if p.logprobs:
            for s in seqs:
                s.logprobs, s.top_logprobs = [], []
        if p.constraint is not None:
            for s in seqs:
                s.constraint = p.constraint.start()
        request.sequences = seqs
        self.rows += seqs
        self.cache = cache if self.cache is None else Cache.merge([self.cache, cache])
        expanded = logits.expand(p.n, -1)
        self.logits = expanded.clone() if self.logits is None else torch.cat([self.logits, expanded])
        return seqs

    def _decoder(self):
        return None if self.tokenizer is None else IncrementalDecoder(self.tokenizer)

    @property
    def active(self) -> int:
        return len(self.rows)

    def cancel(self, request: Request) -> None:
        """Drop a request's rows (a client went away); its cache rows are freed."""
        for s in request.sequences:
            if not s.finish_reason:
                s.finish_reason = "cancelled"
        self._retire()

    # -- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Sample one token for every active row, then advance the rows that go on."""
        if not self.rows:
            return []
        events, next_tokens = [], []
        for row, seq in enumerate(self.rows):
            token, event = self._sample(seq, self.logits[row])
            events.append(event)
            next_tokens.append(token)
        keep = [i for i, s in enumerate(self.rows) if not s.finish_reason]
        if keep:
            tokens = torch.tensor([[next_tokens[i]] for i in keep], device=self.device)
            if len(keep) < len(self.rows):
                self.cache = self.cache.select(keep)
            self.rows = [self.rows[i] for i in keep]
            with _threads(self.threads, self.device):
                self.logits = self.model(tokens, cache=self.cache, last_only=True)[:, -1].float()
        else:
            self.rows, self.cache, self.logits = [], None, None
        return events

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.finish_reason]
        if len(keep) == len(self.rows):
            return
        if keep:
            self.cache, self.logits = self.cache.select(keep), self.logits[keep]
            self.rows = [self.rows[i] for i in keep]
        else:
            self.rows, self.cache, self.logits = [], None, None

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, TokenEvent]:
        p = seq.request.params
        scored = logits if seq.counts is None else apply_penalties(logits, seq.counts, seq.seen, p)
        if seq.constraint is not None:  # the one place constraints act: mask before, advance after
            scored = seq.constraint.restrict(scored)
        token = sample(scored, p, seq.request.generator)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        logprob = top = None
        if seq.logprobs is not None:
            logprob, top = token_logprobs(logits, token, p.top_logprobs)
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or {})
        if seq.counts is not None:
            seq.counts[token] += 1
            seq.seen[token] = True
        return token, self._advance(seq, token, logprob, top)

    def _advance(self, seq: Sequence, token: int, logprob, top) -> TokenEvent:
        p = seq.request.params
        stop_token = token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos)
        delta_text = ""
        if stop_token:
            seq.finish_reason = "stop"
            if seq.decoder is not None:
                seq.text += seq.decoder.flush()
        else:
            seq.token_ids.append(token)
            if seq.decoder is not None:
                seq.text += seq.decoder.push(token)
            if len(seq.token_ids) >= p.max_new_tokens:
                seq.finish_reason = "length"
                if seq.decoder is not None:
                    seq.text += seq.decoder.flush()
        if p.stop:
            window = max(0, seq.emitted - max(len(s) for s in p.stop))
            hits = [i for i in (seq.text.find(s, window) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                seq.finish_reason = "stop"
        end = len(seq.text) if seq.finish_reason else len(seq.text) - _held_back(seq.text, p.stop)
        if end > seq.emitted:
            delta_text = seq.text[seq.emitted:end]
            seq.emitted = end
        return TokenEvent(seq.request.prompt_index, seq.index, None if stop_token else token, delta_text,
                          seq.finish_reason, logprob, top)

    def run(self, requests: Iterable[Request]) -> Iterator[TokenEvent]:
        for r in requests:
            self.add(r)
        while self.rows:
            yield from self.step()
