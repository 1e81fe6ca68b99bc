"""Markovian RSA: test-time compute for ZAYA1 over any generator backend.

    from zaya.rsa import solve, LocalBackend, OpenAIBackend

    result = solve(llm, "Find ... Put the final answer in \\\\boxed{}.", profile="deployment")
    result = solve(OpenAIBackend("http://gpu:8000", tokenizer=llm.tokenizer), problem,
                   profile="report-headline", n=8, audit_path="run.jsonl")
    result.answer, result.vote.counts, result.completion_tokens, result.to_dict()

Modules: ``config`` (parameters, named profiles), ``prompts`` (aggregation templates),
``answers`` (``\\boxed{}`` extraction, normalisation, vote), ``backends`` (local engine,
OpenAI-compatible HTTP), ``algorithm`` (the rounds, selection, audit, as the step machine
``RSARun``), ``drivers`` (``solve`` one problem, ``run_batched`` many in lockstep, ``sample_pool``).
This package sits below ``zaya.llm``: it takes a model by duck typing and never imports the
package ``zaya``, the CLI, the server or ``zaya eval``.
Sources: ZAYA1-8B report arXiv 2605.05365 §VI; RSA arXiv 2509.26626; Zyphra/vllm ``rsa/`` and
``examples/markovian_rsa/``.
"""

from zaya.rsa.algorithm import GenerateRequest, Member, RSAResult, RSARun
from zaya.rsa.answers import Vote, boxed_answer, extract_boxed, majority_vote, normalize_answer
from zaya.rsa.backends import (
    Backend,
    BackendError,
    Candidate,
    LocalBackend,
    OpenAIBackend,
    tokenizer_from_file,
)
from zaya.rsa.config import DEFAULT_PROFILE, PROFILES, RSAConfig, RSAError, make_config
from zaya.rsa.drivers import run_batched, sample_pool, solve
from zaya.rsa.prompts import TEMPLATES, ZYPHRA, FormatTemplate, ZyphraTemplate

__all__ = [
    "solve", "run_batched", "sample_pool", "RSARun", "GenerateRequest", "RSAResult", "Member",
    "RSAConfig", "RSAError", "PROFILES", "DEFAULT_PROFILE", "make_config", "Backend", "BackendError", "Candidate", "LocalBackend", "OpenAIBackend",
    "tokenizer_from_file", "Vote", "boxed_answer", "extract_boxed", "majority_vote",
    "normalize_answer", "TEMPLATES", "ZYPHRA", "ZyphraTemplate", "FormatTemplate",
]
