"""The `Engine`: continuous batching over the paged cache, on token ids.

A request (one prompt, n samples) waits in a queue until its prompt is prefilled, in chunks, into
the paged cache, reusing the longest cached prefix (zaya.engine.cache); its n samples then share
the prompt's blocks. Every `step()` runs one decode forward for the rows that go on, prefill
chunks for waiting prompts within a per-step token budget (so a long prompt never stalls the
running rows for more than a chunk; waiting prompts in the same state share a forward, right-
padded to the longest chunk), and samples one token for every row with fresh logits. Rows
that finish give their blocks back; their full blocks stay cached for later requests. When the
pool runs short in a decode step, the newest rows give their blocks back and are queued to be
recomputed (mostly from the prefix cache), as vLLM does; a running row is never corrupted.
The server drives `step()` from its scheduler; `run()` drives it to completion.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from zaya import fused
from zaya.engine import compiled
from zaya.engine import speculative as spec
from zaya.engine.cache import CACHE_FLAGS, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_SEQS, CacheFullError, PagedCache
from zaya.engine.runner import ForwardBatch, forward, forward_rows
from zaya.engine.sequence import Request, Sequence, TokenEvent
from zaya.errors import ContextLengthError, ZayaError
from zaya.sampling import (SamplingParams, apply_penalties, fit_max_new_tokens, sample, token_logprobs,
                           verify_draft)
from zaya.tokenizer import IncrementalDecoder


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


@dataclass
class _Prefill:
    """Waiting work: ``seq`` computes ``tokens`` (its prompt, or after preemption its prompt and
    output so far); the request's other samples fork from it when that is done."""

    seq: Sequence
    tokens: list[int]
    followers: list[Sequence] = field(default_factory=list)


class Engine:
    """Generation over a paged cache. ``cache`` shares another engine's pool (the `LLM` keeps one
    for all its calls); otherwise one is built from ``cache_memory`` (bytes, None: the default
    budget), ``block_size``, ``max_seqs`` (live sequences) and ``prefix_caching``. ``step_tokens``
    is the per-step token budget (decode rows plus prefill tokens); ``prefill_chunk`` the longest
    prefill forward. ``speculative`` is the longest prompt-lookup draft for requests that do not
    say (0: off; zaya.engine.speculative); decode work is counted in ``stats`` (a shared
    `SpecStats`, else the engine's own). ``compile`` ("auto", "on", "off"; None: ``ZAYA_COMPILE``,
    else auto) says whether decode steps go through `compiled.compile_decode` (``self.compile``
    is the decision)."""

    def __init__(self, model, tokenizer=None, *, max_context: int | None = None, prefill_chunk: int = 512,
                 threads: int | None = None, cache: PagedCache | None = None, cache_memory: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_seqs: int = DEFAULT_MAX_SEQS,
                 prefix_caching: bool = True, step_tokens: int | None = None, identity: str = "",
                 speculative: int = 0, stats: spec.SpecStats | None = None, compile: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.threads = decode_threads() if threads is None else threads
        self.config = model.config
        self.context_limit = max_context or self.config.max_position_embeddings
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens or prefill_chunk
        if self.prefill_chunk < 1 or self.step_tokens < 1:
            raise ZayaError("prefill_chunk and step_tokens must be positive")
        param = next(model.parameters())
        self.dtype, self.device = param.dtype if param.is_floating_point() else torch.bfloat16, param.device
        self.compile = compiled.apply(model, compile, self.device)
        self.cache = cache or PagedCache(self.config, dtype=self.dtype, device=self.device, memory=cache_memory,
                                         block_size=block_size, max_seqs=max_seqs, max_context=self.context_limit,
                                         identity=identity, prefix_caching=prefix_caching)
        # the longest sequence that can run: the context limit, or less when the cache holds less
        self.max_context = min(self.context_limit, self.cache.sequence_limit)
        self.eos_ids = set(self.config.eos_ids) | set(getattr(tokenizer, "eos_ids", ()) or ())
        self.rows: list[Sequence] = []       # decoding; row i's next-token logits are self.logits[i]
        self.logits: torch.Tensor | None = None
        self.waiting: deque[_Prefill] = deque()
        self.prompt_tokens_computed = 0      # prefill positions actually run through the model
        self.preemptions = 0                 # rows that gave their blocks back to be recomputed
        self.prefill_forwards = 0            # forwards that ran prefill chunks (of one or more sequences)
        self.speculative = self._draft_limit(speculative)
        self.verify_rows = fused.verify_rows(model)
        self.verify: spec.Verify | None = None   # a verify forward's rows, until sampled
        self.spec_stats = stats if stats is not None else spec.SpecStats()  # shared when given

    # -- admission ------------------------------------------------------------------------------
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise ContextLengthError (or ZayaError) if the request can never run."""
        if prompt_len < 1:
            raise ZayaError("the prompt is empty")
        fit_max_new_tokens(prompt_len, self.context_limit, params.max_new_tokens)
        total = prompt_len + params.max_new_tokens
        if not self.cache.fits(total):
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) needs more KV cache "
                f"than the cache budget holds: {self.cache.capacity_tokens:,} tokens ({self.cache.memory / 2**20:,.1f} "
                f"MiB); raise {CACHE_FLAGS}")
        if params.n > self.cache.max_seqs:
            raise ZayaError(f"n={params.n} is more than the {self.cache.max_seqs} sequences the cache holds")

    def add(self, request: Request) -> list[Sequence]:
        """Queue a request; its prompt is prefilled by the coming steps."""
        ids, p = request.prompt_ids, request.params
        self.check(len(ids), p)
        vocab = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ZayaError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        seqs = [Sequence(request, i, self._decoder()) for i in range(p.n)]
        if p.uses_penalties:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seen[torch.tensor(ids, device=self.device)] = True
            for s in seqs:
                s.counts, s.seen = torch.zeros(vocab, device=self.device), seen.clone()
        if p.logprobs:
            for s in seqs:
                s.logprobs, s.top_logprobs = [], []
        if p.constraint is not None:
            for s in seqs:
                s.constraint = p.constraint.start()
        # a constrained row does not draft: its mask depends on every token before it, so a
        # verify would have to advance the grammar through the draft position by position
        limit = 0 if p.constraint is not None else spec.draft_limit(p.speculative, self.speculative)
        if limit:
            for s in seqs:
                s.drafter = spec.Drafter(min(limit, self.cache.block_size - 1))
        request.sequences = seqs
        self.waiting.append(_Prefill(seqs[0], list(ids), seqs[1:]))
        return seqs

    @staticmethod
    def _draft_limit(value) -> int:
        value = int(value or 0)
        if not 0 <= value <= spec.MAX_DRAFT:
            raise ZayaError(f"speculative must be a draft length in [0, {spec.MAX_DRAFT}], got {value}")
        return value

    def _decoder(self):
        return None if self.tokenizer is None else IncrementalDecoder(self.tokenizer)

    @property
    def active(self) -> int:
        """Sequences decoding or waiting for their prefill."""
        return len(self.rows) + sum(1 + len(w.followers) for w in self.waiting)

    def cancel(self, request: Request) -> None:
        """Drop a request's sequences (a client went away); their blocks are given back."""
        with self.cache.lock:
            for s in request.sequences:
                if not s.finish_reason:
                    s.finish_reason = "cancelled"
            for work in [w for w in self.waiting if w.seq.request is request]:
                self.waiting.remove(work)
                self._close(work.seq)
            self._retire()

    def reset(self) -> None:
        """Give back every block and slot this engine holds (its requests are dropped)."""
        with self.cache.lock:
            for seq in self.rows + [w.seq for w in self.waiting]:
                self._close(seq)
            self.rows, self.logits, self.waiting, self.verify = [], None, deque(), None

    def _close(self, seq: Sequence) -> None:
        if seq.cache is not None:
            self.cache.close(seq.cache)
            seq.cache = None

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every row by one token and the waiting prompts by up to the token budget;
        returns the tokens sampled in this step."""
        with self.cache.lock:
            self._decode()
            self._prefill(max(self.step_tokens - len(self.rows), self.cache.block_size))
            return self._sample_rows()

    def _decode(self) -> None:
        """One forward for every row's last sampled token, and its draft when a row has one."""
        drafts = spec.fit(spec.propose(self.rows, self.context_limit), self.verify_rows)
        S = 1 + max(map(len, drafts), default=0)
        i = 0
        while i < len(self.rows):  # blocks for each row's new positions, newest rows yielding theirs
            if self.cache.reserve(self.rows[i].cache, S):
                i += 1
            elif not self._preempt_one(keep=i):
                raise CacheFullError(f"the KV cache is full and nothing can give blocks back; raise {CACHE_FLAGS}")
        if not self.rows:
            return
        seqs = [s.cache for s in self.rows]
        if S > 1:
            drafts = drafts[:len(seqs)]
            batch = ForwardBatch(self.cache, seqs, S, keep_positions=True)
            tokens = spec.verify_tokens(seqs, drafts, S, self.device)
            with _threads(self.threads, self.device):
                logits = forward(self.model, batch, tokens, last_only=False)
            self.verify = spec.Verify(batch, drafts, logits)
            self.logits = logits[:, 0]
            return
        tokens = torch.tensor([[c.tokens[c.computed]] for c in seqs], device=self.device)
        with _threads(self.threads, self.device):
            self.logits = forward(self.model, ForwardBatch(self.cache, seqs, 1), tokens)
        for c in seqs:
            self.cache.advance(c, 1)
        self.spec_stats.row_forwards += len(seqs)
        self.spec_stats.tokens += len(seqs)

    def _preempt_one(self, keep: int) -> bool:
        """Free blocks for row ``keep``: a prefill in progress goes back to the queue first, else
        the newest row (which may be ``keep`` itself). False when there is nothing to free."""
        started = [w for w in self.waiting if w.seq.cache is not None]
        if started:
            self._close(started[-1].seq)
        elif len(self.rows) > 1 or keep > 0:
            seq = self.rows.pop()
            tokens = seq.cache.tokens
            self._close(seq)
            self.waiting.appendleft(_Prefill(seq, tokens))
        else:
            return False
        self.preemptions += 1
        return True

    def _prefill(self, budget: int) -> None:
        while self.waiting and budget > 0:
            group = self._prefill_group(budget)
            if not group:
                return
            S = max(n for _, n in group)
            budget -= len(group) * S
            self._prefill_forward(group, S)

    def _prefill_group(self, budget: int) -> list[tuple[_Prefill, int]]:
        """The waiting work whose next chunks run in this forward, in queue order, with each
        chunk's length: the head of the queue, then the works after it that are in the same
        state (no cached positions, or some) while the padded forward stays within ``budget``
        tokens and its padding within a quarter of the real tokens; every row has blocks for the
        padded length."""
        group: list[tuple[_Prefill, int]] = []
        for work in list(self.waiting)[:self.cache.max_seqs]:
            if work.seq.cache is None and group and (not self.cache.free_slots or self._would_share(work, group)):
                break
            if work.seq.cache is None and not self._start(work):
                break
            c = work.seq.cache
            n = min(len(work.tokens), (c.computed // self.prefill_chunk + 1) * self.prefill_chunk,
                    c.computed + budget) - c.computed
            if group:
                S = max(n, max(m for _, m in group))
                real = n + sum(m for _, m in group)
                fresh = group[0][0].seq.cache.computed == 0
                padded = (len(group) + 1) * S
                if (c.computed == 0) != fresh or padded > budget or 4 * (padded - real) > real:
                    break
                if not self.cache.reserve(c, S):
                    break
                if S > max(m for _, m in group) and not all(self.cache.reserve(w.seq.cache, S) for w, _ in group):
                    break  # (what the rows already took stays reserved: their next chunks use it)
            elif not self.cache.reserve(c, n):
                if not self.rows:
                    raise CacheFullError(f"the KV cache is held by other generations; raise {CACHE_FLAGS}")
                return []  # the running rows give blocks back as they finish
            group.append((work, n))
        return group

    def _would_share(self, work: _Prefill, group) -> bool:
        """Whether ``work`` starts with full blocks that a row of ``group`` is about to compute:
        it then waits for them to be cached (prompts of one RSA round share their opening)."""
        if not self.cache.prefix_caching:
            return False
        bs, tokens = self.cache.block_size, work.tokens
        for other, _ in group:
            have = other.seq.cache.computed // bs
            limit = min(len(tokens) - 1, len(other.tokens)) // bs
            if limit > have and tokens[:(have + 1) * bs] == other.tokens[:(have + 1) * bs]:
                return True
        return False

    def _prefill_forward(self, group: list[tuple[_Prefill, int]], S: int) -> None:
        """One forward over the group's chunks, right-padded to S; a padded row keeps its real
        positions only (`PagedCache.truncate`, as for a rejected draft), so its KV, CCA state and
        logits are those of a forward of its own."""
        caches = [w.seq.cache for w, _ in group]
        padded = any(n < S for _, n in group)
        rows = [w.tokens[c.computed:c.computed + n] for (w, n), c in zip(group, caches)]
        tokens = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows], device=self.device)
        batch = ForwardBatch(self.cache, caches, S, keep_positions=padded)
        logits = forward_rows(self.model, batch, tokens, [n - 1 for _, n in group])
        self.prefill_forwards += 1
        for i, ((work, n), c) in enumerate(zip(group, caches)):
            self.prompt_tokens_computed += n
            if n < S:
                self.cache.truncate(c, c.computed + n, batch, i)
            else:
                self.cache.advance(c, n)
            if c.computed == len(work.tokens):
                del self.waiting[next(j for j, w in enumerate(self.waiting) if w is work)]
                self._join(work, logits[i:i + 1])

    def _start(self, work: _Prefill) -> bool:
        """Give waiting work its cache: a slot, and the longest cached prefix of its tokens."""
        try:
            work.seq.cache = self.cache.open(work.tokens)
        except CacheFullError:
            if not self.rows:
                raise CacheFullError(f"all {self.cache.max_seqs} sequence slots are held by other "
                                     "generations") from None
            return False
        hit = self.cache.match(work.seq.cache)
        request = work.seq.request
        if request.cached_tokens is None:
            request.cached_tokens = hit
        return True

    def _join(self, work: _Prefill, logits: torch.Tensor) -> None:
        """A prefill finished: its sequence and the samples forked from it start decoding."""
        rows = [work.seq]
        for follower in work.followers:
            try:
                follower.cache = self.cache.fork(work.seq.cache)
                rows.append(follower)
            except CacheFullError:  # no room to fork now: it recomputes from the prefix cache later
                self.waiting.appendleft(_Prefill(follower, list(work.tokens)))
        self.rows += rows
        expanded = logits.expand(len(rows), -1)
        self.logits = expanded.clone() if self.logits is None else torch.cat([self.logits, expanded])

    def _sample_rows(self) -> list[TokenEvent]:
        if not self.rows:
            return []
        events, tokens = [], []
        verified = self.verify.B if self.verify is not None else 0
        for row, seq in enumerate(self.rows):
            if row < verified:
                events += spec.accept(self, seq, self.verify, row)
                continue
            token, event = self._sample(seq, self.logits[row])
            events.append(event)
            tokens.append((seq, token))
        for seq, token in tokens:
            if not seq.finish_reason:
                seq.cache.tokens.append(token)
        self.logits = self.verify = None  # consumed: the next step's decode computes the rows' next logits
        self._retire()
        return events

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.finish_reason]
        if len(keep) == len(self.rows):
            return
        for s in self.rows:
            if s.finish_reason:
                self._close(s)
        self.rows = [self.rows[i] for i in keep]

    def _sample(self, seq: Sequence, logits: torch.Tensor, draft: int | None = None) -> tuple[int, TokenEvent]:
        """The next token from ``logits``; where a draft proposed one, by the speculative rule."""
        p = seq.request.params
        scored = logits if seq.counts is None else apply_penalties(logits, seq.counts, seq.seen, p)
        if seq.constraint is not None:  # the one place constraints act: mask before, advance after
            scored = seq.constraint.restrict(scored)
        generator = seq.request.generator
        token = sample(scored, p, generator) if draft is None else verify_draft(scored, draft, p, generator)
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
        """Add the requests and step until every sequence is done (blocks are given back even
        when the caller stops early)."""
        try:
            for r in requests:
                self.add(r)
            while self.active:
                yield from self.step()
        finally:
            self.reset()
