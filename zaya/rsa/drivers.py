"""Drivers: loops that run ``RSARun`` step machines on a generator backend.

``solve`` runs one problem. ``run_batched`` advances many runs together: at each step it collects
every run's pending request, merges those with the same settings into one ``Backend.generate``
call (so the round-t prompts of all problems decode as one batch) and feeds each run its share.
``sample_pool`` draws independent samples for many problems the same way; ``zaya eval`` and the
self-aggregation data builder use it. The server drives runs on its own scheduler
(``zaya.server.rsa``).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from zaya.rsa.algorithm import GenerateRequest, RSAResult, RSARun
from zaya.rsa.backends import Candidate, LocalBackend, derive_seed


def solve(backend, problem, *, profile=None, template=None, extractor=None, audit_path=None,
          progress: bool = True, **overrides) -> RSAResult:
    """Run Markovian RSA on ``problem`` (a string, or a chat-message list ending in the question).

    ``backend`` is a ``Backend`` (``LocalBackend``, ``OpenAIBackend``) or a ``zaya.LLM``.
    ``profile`` names a profile of ``zaya.rsa.config.PROFILES`` (default ``deployment``);
    ``overrides`` set any ``RSAConfig`` field (``n``, ``k``, ``rounds``, ``budget``, ``tail``,
    ``temperature``, ``seed``, ``selection``, ``batch_size``, ...). ``template`` is an aggregation
    template (name, callable or format string), ``extractor`` maps a text to an answer string.
    """
    if not hasattr(backend, "count_tokens") and hasattr(backend, "apply_chat_template"):
        backend = LocalBackend(backend)
    with RSARun(backend, problem, profile=profile, template=template, extractor=extractor,
                audit_path=audit_path, **overrides) as run:
        run_batched(backend, [run], progress=progress)
    return run.result


def run_batched(backend, runs: list[RSARun], *, progress: bool = False) -> None:
    """Advance ``runs`` until all are finished, one backend call per step and settings.

    Requests that differ only in their seed share a call, which uses the first one's seed (runs
    in list order): results are reproducible for a fixed list of runs.
    """
    while pending := [(run, run.next_request()) for run in runs if run.next_request() is not None]:
        groups: dict[tuple, list[tuple[RSARun, GenerateRequest]]] = {}
        for run, request in pending:
            groups.setdefault(_batch_key(request), []).append((run, request))
        fed = []
        for group in groups.values():
            merged = [m for _, request in group for m in request.prompts]
            outputs = _generate(backend, group[0][1], merged, progress)
            at = 0
            for run, request in group:
                fed.append((run, outputs[at:at + len(request.prompts)]))
                at += len(request.prompts)
        for run, outputs in fed:
            run.feed(outputs)


def _batch_key(request: GenerateRequest) -> tuple:
    sampling = request.sampling()
    sampling.pop("seed")
    return request.n, tuple(sorted(sampling.items()))


def _generate(backend, request: GenerateRequest, prompts, progress: bool) -> list[list[Candidate]]:
    bar = _RoundBar(request.label, len(prompts) * request.n) if progress else None
    try:
        return backend.generate(prompts, n=request.n, progress=bar.update_tokens if bar else None,
                                **request.sampling())
    finally:
        if bar:
            bar.close()


def sample_pool(backend, questions: list[str], *, samples: int, max_tokens: int, temperature: float,
                top_p: float, seed: int | None, max_batch: int = 256, progress: bool = True
                ) -> list[list[Candidate]]:
    """``samples`` independent candidates per question; questions are decoded together in chunks
    of at most ``max_batch`` sequences."""
    per = max(1, max_batch // samples)
    out, bar = [], progress_bar(len(questions), "samples", progress)
    for start in range(0, len(questions), per):
        chunk = questions[start:start + per]
        msgs = [[{"role": "user", "content": q}] for q in chunk]
        out += backend.generate(msgs, n=samples, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=0, seed=derive_seed(seed, start))
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over problems on stderr, or None."""
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="prob", dynamic_ncols=True, file=sys.stderr)


class _RoundBar:
    """A tqdm bar counting finished candidates, with decoded tokens as a postfix."""

    def __init__(self, desc: str, total: int):
        self.bar = tqdm(total=total, desc=desc, unit="cand", leave=True, dynamic_ncols=True)
        self.tokens = 0

    def update_tokens(self, tokens: int, finished: int):
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens} tok", refresh=False)
        self.bar.update(finished)

    def close(self):
        self.bar.close()
