"""Generator backends for RSA: the in-process engine, or any OpenAI-compatible endpoint.

A backend turns chat-message lists into candidates and measures text in tokens:

    generate(messages_list, *, n, max_tokens, temperature, top_p, top_k, seed,
             enable_thinking=None, batch_size=None, progress=None, thinking_budget=None)
        -> list[list[Candidate]]
    count_tokens(text) -> int
    tail(text, tau) -> str        # the last tau tokens of text, token-exact

``generate`` returns one list of ``n`` candidates per message list, in order. ``progress``, when
given, is called as ``progress(new_tokens, finished_candidates)`` while decoding runs.

Token counting and tails use a tokenizer with ``encode(text, add_special_tokens=False)`` and
``decode(ids)`` (``zaya.tokenizer.Tokenizer``, or ``tokenizer_from_file`` for a bare
``tokenizer.json``). A tail is ``decode(ids[-tau:])``; when that text re-encodes to more than tau
tokens (a merge at the new left edge, or a UTF-8 sequence cut in half) tokens are shaved from its
front until it fits, so ``count_tokens(tail(x, tau)) <= tau`` always holds: that is what keeps every
aggregation prompt within |question| + K*tau + template.

``LocalBackend`` renders messages with the model's chat template and decodes through the engine:
N samples of one prompt share one prefill (the engine forks the cache), N aggregation prompts decode
as one batch, in chunks of ``batch_size`` sequences when set. ``OpenAIBackend`` sends one ``n=1``
request per candidate (not every server honours ``n``), at most ``max_concurrency`` at a time; it
reads ``reasoning_content`` / ``reasoning`` and ``content``, and counts tokens with the given
tokenizer or, without one, with the server's vLLM-style ``/tokenize`` and ``/detokenize`` routes.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from zaya.chat import generation_starts_in_reasoning, split_reasoning
from zaya.rsa.config import RSAError

Messages = list[dict]
Progress = Callable[[int, int], None]
THINK_END = "</think>"


class BackendError(RSAError):
    """A generation request failed (HTTP status and body excerpt in the message)."""


@dataclass
class Candidate:
    text: str                  # the whole generated text
    reasoning: str             # the part before </think> ("" when the model did not think)
    content: str               # the part after </think> (the whole text when there was no think)
    finish_reason: str | None  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0       # from the start of its generate() call to its last token
    cached_tokens: int | None = None  # prompt tokens the prefix cache gave (None: not reported)


class Backend(Protocol):
    name: str

    def generate(self, messages_list: Sequence[Messages], *, n: int, max_tokens: int,
                 temperature: float, top_p: float, top_k: int, seed: int | None,
                 enable_thinking: bool | None = None, batch_size: int | None = None,
                 progress: Progress | None = None, thinking_budget: int | None = None
                 ) -> list[list[Candidate]]: ...

    def count_tokens(self, text: str) -> int: ...

    def tail(self, text: str, tau: int) -> str: ...


def derive_seed(seed: int | None, *keys: int) -> int | None:
    """A well-mixed 31-bit seed for sub-request ``keys`` of a seeded run (None stays None)."""
    if seed is None:
        return None
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def candidate(text: str, started_in_reasoning: bool, finish_reason: str | None, prompt_tokens: int,
              completion_tokens: int, seconds: float, cached_tokens: int | None = None) -> Candidate:
    """A Candidate from a completion's text, its reasoning split off as the chat layer does."""
    reasoning, content = split_reasoning(text, started_in_reasoning)
    return Candidate(text, reasoning or "", content, finish_reason, prompt_tokens, completion_tokens,
                     seconds, cached_tokens)


class EventText:
    """Streamed ``TokenEvent``s gathered per (prompt, sample): text, tokens, finish, time."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.texts: dict[tuple[int, int], list[str]] = {}
        self.tokens: dict[tuple[int, int], int] = {}
        self.finished: dict[tuple[int, int], tuple[str, float]] = {}

    def add(self, key: tuple[int, int], ev) -> tuple[int, int]:
        """Record one event; returns (new tokens, finished sequences) for progress counters."""
        self.texts.setdefault(key, []).append(ev.text)
        new = int(ev.token_id is not None)
        self.tokens[key] = self.tokens.get(key, 0) + new
        if ev.finish_reason:
            self.finished[key] = (ev.finish_reason, time.perf_counter() - self.start)
        return new, int(bool(ev.finish_reason))

    def candidate(self, key: tuple[int, int], started_in_reasoning: bool, prompt_tokens: int
                  ) -> Candidate:
        finish, seconds = self.finished.get(key, (None, 0.0))
        return candidate("".join(self.texts.get(key, [])), started_in_reasoning, finish,
                         prompt_tokens, self.tokens.get(key, 0), seconds)


class TokenTools:
    """``count_tokens`` and token-exact ``tail`` on top of ``self.tokenizer``."""

    def __init__(self, tokenizer=None, name: str = "tokens"):
        self.tokenizer, self.name = tokenizer, name

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text)) if text else 0

    def tail(self, text: str, tau: int) -> str:
        """The last ``tau`` tokens' text, without the broken characters a cut leaves at its ends
        (a generation stopped inside a multi-byte character, a tail starting inside one)."""
        text = text.rstrip("\ufffd")
        ids = self._encode(text)
        if len(ids) <= tau:
            return text
        piece = self.tokenizer.decode(ids[-tau:]).lstrip("\ufffd")
        while len(ids := self._encode(piece)) > tau:
            piece = self.tokenizer.decode(ids[1:]).lstrip("\ufffd")
        return piece


class LocalBackend(TokenTools):
    """The in-process engine: ``zaya.LLM`` (``apply_chat_template`` + ``generate``/``stream``)."""

    drafts = True  # takes ``speculative`` (prompt-lookup drafting) per call

    def __init__(self, llm, batch_size: int | None = None):
        self.llm = llm
        self.spec_stats = getattr(llm, "spec_stats", None)
        self.tokenizer = llm.tokenizer
        self.batch_size = batch_size
        self.name = f"local:{getattr(llm, 'name', None) or type(llm).__name__}"

    def generate(self, messages_list, *, n, max_tokens, temperature, top_p, top_k, seed,
                 enable_thinking=None, batch_size=None, progress=None, thinking_budget=None,
                 speculative=None):
        prompts = [
            list(self.llm.apply_chat_template(m, add_generation_prompt=True,
                                              enable_thinking=enable_thinking))
            for m in messages_list
        ]
        thinking = [self._starts_in_reasoning(p) for p in prompts]
        out: list[list[Candidate]] = [[] for _ in prompts]
        sampling = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, speculative=speculative)
        if thinking_budget is not None:
            sampling["thinking_budget"] = thinking_budget
        start = time.perf_counter()
        decode = self._stream if progress else self._generate
        for j, (rows, n_each) in enumerate(_chunks(len(prompts), n, batch_size or self.batch_size)):
            chunk = [prompts[p] for p in rows]
            # a seed per prompt: one for the whole call would make its prompts draw the same
            # uniforms, and a round's prompts would sample in lockstep
            sampling.update(n=n_each, seed=None if seed is None else [derive_seed(seed, j, p) for p in rows])
            for i, cand in decode(chunk, [thinking[p] for p in rows], sampling, progress, start):
                out[rows[i]].append(cand)
        return out

    def _generate(self, chunk, thinking, sampling, progress, start):
        for c in self.llm.generate(chunk, **sampling):
            yield c.prompt_index, candidate(c.text, thinking[c.prompt_index], c.finish_reason,
                                            c.prompt_tokens, len(c.token_ids),
                                            time.perf_counter() - start, getattr(c, "cached_tokens", None))

    def _stream(self, chunk, thinking, sampling, progress, start):
        events = EventText(start)
        for ev in self.llm.stream(chunk, **sampling):
            progress(*events.add((ev.prompt_index, ev.index), ev))
        for p, s in sorted(events.finished):
            yield p, events.candidate((p, s), thinking[p], len(chunk[p]))

    def _starts_in_reasoning(self, prompt_ids: list[int]) -> bool:
        return generation_starts_in_reasoning(self.tokenizer.decode(prompt_ids[-16:]))


def _chunks(n_prompts: int, n: int, batch_size: int | None):
    """Split a generate call into engine calls of at most ``batch_size`` sequences.

    Yields (prompt indices, samples per prompt). Samples of one prompt stay together when they
    fit, so they keep sharing one prefill.
    """
    if not batch_size or batch_size >= n_prompts * n:
        yield list(range(n_prompts)), n
    elif n == 1:
        for s in range(0, n_prompts, batch_size):
            yield list(range(s, min(n_prompts, s + batch_size))), 1
    else:
        for p in range(n_prompts):
            for s in range(0, n, batch_size):
                yield [p], min(batch_size, n - s)


class OpenAIBackend(TokenTools):
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, ``zaya serve``, a hosted API)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 tokenizer=None, max_concurrency: int = 16, timeout: float = 3600.0,
                 transport=None):
        import httpx  # only this backend needs it

        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.name = f"openai:{self.root}"
        self.model = model
        self.max_concurrency = max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.root, headers=headers, timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        self.tokenizer = tokenizer if tokenizer is not None else RemoteTokenizer(self)

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"{method} {self.root}{path} failed: {exc!r}") from exc
        if r.status_code >= 400:
            raise BackendError(
                f"{method} {self.root}{path} -> HTTP {r.status_code}: {r.text[:500].strip()}")
        try:
            return r.json()
        except ValueError as exc:
            raise BackendError(f"{method} {self.root}{path}: response is not JSON: "
                               f"{r.text[:200]!r}") from exc

    def model_name(self) -> str:
        if self.model is None:
            data = self.request("GET", "/v1/models").get("data") or []
            if not data:
                raise BackendError(f"{self.root}/v1/models lists no model; pass model=")
            self.model = data[0]["id"]
        return self.model

    def generate(self, messages_list, *, n, max_tokens, temperature, top_p, top_k, seed,
                 enable_thinking=None, batch_size=None, progress=None, thinking_budget=None):
        model = self.model_name()
        jobs = [(p, s) for p in range(len(messages_list)) for s in range(n)]
        out: list[list[Candidate | None]] = [[None] * n for _ in messages_list]
        start = time.perf_counter()

        def one(p: int, s: int) -> Candidate:
            body = {"model": model, "messages": messages_list[p], "n": 1,
                    "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
            if top_k:
                body["top_k"] = top_k
            if seed is not None:
                body["seed"] = derive_seed(seed, p, s)
            if enable_thinking is not None:
                body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
            if thinking_budget is not None:
                body["thinking_budget"] = thinking_budget
            return self._candidate(self.request("POST", "/v1/chat/completions", body), start)

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(one, p, s): (p, s) for p, s in jobs}
            try:
                for fut in as_completed(futures):
                    p, s = futures[fut]
                    out[p][s] = cand = fut.result()
                    if progress:
                        progress(cand.completion_tokens, 1)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return out

    def _candidate(self, response: dict, start: float) -> Candidate:
        try:
            choice = response["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"malformed chat completion: {str(response)[:300]}") from exc
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        content = message.get("content") or ""
        if not reasoning and THINK_END in content:  # server without a reasoning parser
            parsed, content = split_reasoning(content, started_in_reasoning=True)
            reasoning = parsed or ""
        text = f"{reasoning}{THINK_END}{content}" if reasoning and content else reasoning or content
        usage = response.get("usage") or {}
        return Candidate(text, reasoning, content, choice.get("finish_reason"),
                         int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0),
                         time.perf_counter() - start)


class RemoteTokenizer:
    """Tokenizes through a server's vLLM-style ``/tokenize`` and ``/detokenize`` routes."""

    def __init__(self, backend: OpenAIBackend):
        self.backend = backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        body = {"model": self.backend.model_name(), "prompt": text,
                "add_special_tokens": add_special_tokens}
        try:
            return list(self.backend.request("POST", "/tokenize", body)["tokens"])
        except (BackendError, KeyError) as exc:
            raise BackendError(
                f"token-exact tails need a tokenizer: {self.backend.root}/tokenize is not usable "
                f"({exc}); pass the model's tokenizer (zaya solve --tokenizer PATH)") from exc

    def decode(self, ids: Sequence[int]) -> str:
        body = {"model": self.backend.model_name(), "tokens": list(ids)}
        return self.backend.request("POST", "/detokenize", body)["prompt"]


class _FileTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def tokenizer_from_file(path: str):
    """A tokenizer from ``tokenizer.json`` (or a directory holding one), via ``tokenizers``."""
    from pathlib import Path

    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return _FileTokenizer(Tokenizer.from_file(str(p)))
