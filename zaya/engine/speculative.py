"""Speculative decoding with prompt-lookup drafts, verified exactly in one forward.

Drafting (prompt lookup / n-gram speculation, Saxena 2023; vLLM's ``ngram`` method): the last n
tokens of a sequence (n = 4 down to 1) are looked up among its earlier tokens, prompt and output
alike; the tokens that followed their latest earlier occurrence are the draft. No second model is
involved, so drafts cost a dictionary lookup per step. A one-token match drafts only while the
row's last draft was accepted (it is copying): elsewhere such matches are mostly chance (none of
them right on random prompts, 14% in RSA aggregation rounds), and in a batch one row's draft
makes every row's forward k + 1 positions long.

Verification: a row's last sampled token and its k drafted tokens go through the model as one
forward of k + 1 positions (`ForwardBatch` with ``keep_positions``; rows with shorter drafts are
padded and their padding is dropped). Position j's logits decide the token after draft j - 1 with
`zaya.sampling.verify_draft` (greedy: the argmax; sampling: the speculative-sampling rule), the
first rejected position yields the model's own token, and a fully accepted draft earns one more
token from the last position. The cache then keeps the accepted positions only:
`PagedCache.truncate` gives back the blocks past them and restores each layer's CCA conv window
and delayed value to the last accepted position, from the columns that forward computed.

Padding: a verify forward is as long as its longest draft, so in a large batch where few rows
draft, most of its positions would be padding, and where rows, not weights, set a forward's cost
(a small model, many rows) that padding costs as much as real positions. `fit` cuts the drafts to
the longest forward whose padding stays within ``PAD_ROWS`` positions or a quarter of the real ones
(the prefill grouping's rule), whichever is more: batch 1 never pads, batch 8 drafts up to 8 freely,
and at 128 rows a forward of 2 positions needs half the rows drafting. A float32 model's decode
steps are fused at up to 256 rows but its calls of several positions only at up to 32
(`zaya.fused.max_batch`): there a verify forward is also kept within 32 rows, since one run eager
costs more per token than the fused steps it would replace (the built-in model's RSA rounds at
256 rows: 18.5 s drafting against 16.2 s not).

Adaptive length: a row's draft length k starts at ``START_K`` (at most the request's limit), grows
by 2 after a fully accepted draft and shrinks by 1 after a rejection, as transformers' assisted
generation does. A row whose drafts keep failing stops drafting for a while (``FAILURES`` drafts in
a row with nothing accepted: off for ``BACKOFF`` steps, doubling up to ``MAX_BACKOFF`` while it
keeps failing), so text with nothing to copy costs a dictionary lookup per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zaya.sampling import MAX_DRAFT

DEFAULT_K = 8        # the longest draft when a request says only "on"
START_K = 4
MAX_NGRAM = 4
FAILURES = 3
BACKOFF = 8
MAX_BACKOFF = 256
PAD_ROWS = 64


def draft_limit(requested: bool | int | None, default: int) -> int:
    """The longest draft for a request: 0 (off), or a length in [1, MAX_DRAFT]. ``requested`` is
    `SamplingParams.speculative`; ``default`` the engine's setting for requests that do not say."""
    if requested is None:
        return default
    if requested is True:
        return default or DEFAULT_K
    return int(requested)  # False -> 0


class Drafter:
    """One sequence's prompt-lookup index and its adaptive draft length."""

    def __init__(self, limit: int):
        self.limit = min(limit, MAX_DRAFT)
        self.k = min(START_K, self.limit)
        self.index: list[dict[tuple, int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self.indexed = 0          # n-grams ending before this position are indexed
        self.failures = 0
        self.off = 0              # steps left without drafting
        self.backoff = BACKOFF
        self.sources: list[tuple[list[int], list[dict[tuple, int]]]] = []
        self.copying = False      # its last draft was accepted, at least in part

    def add_source(self, tokens: list[int]) -> None:
        """Also draft from ``tokens``, a text the output is expected to copy that is not in the
        prompt (a document being edited, the candidates of an aggregation); the sequence's own
        tokens are looked up first."""
        index = [{} for _ in range(MAX_NGRAM + 1)]
        _index_ngrams(index, tokens, 1, len(tokens))
        self.sources.append((list(tokens), index))

    def propose(self, tokens: list[int], room: int) -> list[int]:
        """Up to min(k, room) tokens that followed the latest earlier occurrence of the longest
        suffix (4 tokens down to 2, or 1 while the last draft was accepted) of ``tokens``; empty
        when there is none or drafting is off."""
        if self.off:
            self.off -= 1
            return []
        _index_ngrams(self.index, tokens, max(self.indexed, 1), len(tokens) - 1)
        self.indexed = max(self.indexed, len(tokens))
        k = min(self.k, room)
        if k < 1:
            return []
        shortest = 1 if self.copying else 2  # a one-token match only while drafts are being accepted
        for n in range(min(MAX_NGRAM, len(tokens)), shortest - 1, -1):
            tail = tuple(tokens[-n:])
            for text, index in [(tokens, self.index)] + self.sources:
                e = index[n].get(tail)
                if e is not None and e < len(text):
                    return text[e:e + k]
        return []

    def update(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.k = min(self.limit, self.k + 2)
        else:
            self.k = max(1, self.k - 1)
        self.copying = accepted > 0
        if accepted:
            self.failures, self.backoff = 0, BACKOFF
            return
        self.failures += 1
        if self.failures >= FAILURES:
            self.off, self.failures = self.backoff, 0
            self.backoff = min(MAX_BACKOFF, self.backoff * 2)


def _index_ngrams(index: list[dict[tuple, int]], tokens: list[int], first: int, last: int) -> None:
    """Record, for every n-gram (n <= MAX_NGRAM) ending just before position e in first..last, that
    e follows it (later occurrences overwrite earlier ones)."""
    for e in range(first, last + 1):
        for n in range(1, min(MAX_NGRAM, e) + 1):
            index[n][tuple(tokens[e - n:e])] = e


@dataclass
class SpecStats:
    """Decode work of an engine: a row-forward is one row in one decode or verify forward."""

    row_forwards: int = 0
    tokens: int = 0          # tokens those row-forwards produced
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.row_forwards if self.row_forwards else None

    def as_dict(self) -> dict:
        return {"row_forwards": self.row_forwards, "tokens": self.tokens, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance": self.acceptance,
                "tokens_per_forward": self.tokens_per_forward}


def propose(rows, context_limit: int) -> list[list[int]]:
    """Each row's draft (empty for rows not drafting), within its token and context budgets: a
    draft of d tokens can produce d + 1, so it stops one short of max_new_tokens."""
    drafts = []
    for seq in rows:
        if seq.drafter is None:
            drafts.append([])
            continue
        tokens = seq.cache.tokens
        room = min(seq.request.params.max_new_tokens - len(seq.token_ids) - 1, context_limit - len(tokens))
        drafts.append(seq.drafter.propose(tokens, room))
    return drafts


def fit(drafts: list[list[int]], max_rows: int | None = None) -> list[list[int]]:
    """The drafts cut to the longest verify forward whose padding is within ``PAD_ROWS`` positions
    or a quarter of its real positions (module docstring) and, given ``max_rows``, whose B x S
    rows stay within it (`zaya.fused.verify_rows`); all empty when no length qualifies."""
    B = len(drafts)
    longest = 1 + max(map(len, drafts), default=0)
    if max_rows is not None:
        longest = min(longest, max_rows // max(1, B))
    for S in range(longest, 1, -1):
        real = sum(1 + min(len(d), S - 1) for d in drafts)
        if B * S - real <= max(PAD_ROWS, real // 4):
            return [d[:S - 1] for d in drafts]
    return [[] for _ in drafts]


def verify_tokens(seqs, drafts: list[list[int]], S: int, device) -> torch.Tensor:
    """(B, S) inputs of a verify forward: each row's uncomputed token, its draft, then padding."""
    rows = []
    for c, draft in zip(seqs, drafts):
        last = c.tokens[c.computed]
        rows.append([last] + draft + [last] * (S - 1 - len(draft)))
    return torch.tensor(rows, device=device)


@dataclass
class Verify:
    """A verify forward waiting for its rows to be sampled: logits (B, S, V)."""

    batch: object
    drafts: list[list[int]]
    logits: torch.Tensor

    @property
    def B(self) -> int:
        return len(self.drafts)


def accept(engine, seq, verify: Verify, row: int) -> list:
    """Sample row ``row`` of a verify forward position by position until a draft token is
    rejected or the sequence finishes; keep the accepted positions in the cache; return the
    events of the tokens produced."""
    draft, c = verify.drafts[row], verify.batch.starts[row]
    events, accepted, token = [], 0, None
    for j in range(len(draft) + 1):
        proposed = draft[j] if j < len(draft) else None
        token, event = engine._sample(seq, verify.logits[row, j], proposed)
        events.append(event)
        if seq.finish_reason or token != proposed:
            break
        accepted += 1
    stats = engine.spec_stats
    stats.row_forwards += 1
    stats.tokens += len(events)
    if draft:
        stats.drafted += len(draft)
        stats.accepted += accepted
        seq.drafter.update(len(draft), accepted)
    if not seq.finish_reason:
        cache = seq.cache
        del cache.tokens[c + 1:]
        cache.tokens += draft[:accepted]
        engine.cache.truncate(cache, c + 1 + accepted, verify.batch, row)
        cache.tokens.append(token)
    return events
