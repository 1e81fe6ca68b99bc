"""An RSA run fitted into a model's context: the profile's beta and tau are caps (zaya.rsa.fit)."""

from __future__ import annotations

import pytest

import zaya
from tests.tiny_model import make_tiny_model_dir
from zaya.rsa.config import RSAError, make_config
from zaya.rsa.fit import fit_to_context

DEPLOYMENT = make_config("deployment")  # N=16, K=4, T=2, beta=16384, tau=4096


def test_a_profile_that_fits_is_unchanged():
    assert fit_to_context(DEPLOYMENT, 4 * 4096 + 16384) == DEPLOYMENT


def test_unset_budget_and_tail_shrink_together():
    cfg = fit_to_context(DEPLOYMENT, 970)
    assert (cfg.budget, cfg.tail) == (486, 121)  # tau : beta stays 1 : 4, the remainder goes to beta
    assert 4 * cfg.tail + cfg.budget == 970
    tiny = fit_to_context(DEPLOYMENT, 5)
    assert (tiny.budget, tiny.tail) == (1, 1)


def test_what_was_set_stays_and_the_rest_moves():
    cfg = fit_to_context(make_config("deployment", budget=500), 970, explicit={"budget"})
    assert (cfg.budget, cfg.tail) == (500, 117)
    cfg = fit_to_context(make_config("deployment", tail=100), 970, explicit={"tail"})
    assert (cfg.budget, cfg.tail) == (570, 100)


def test_explicit_values_that_cannot_fit_say_what_is_left():
    with pytest.raises(RSAError, match="budget 2000 does not fit: 970 tokens of context are left after the "
                                       "prompt and K=4 tails need at least 4, so at most 966 fit"):
        fit_to_context(make_config("deployment", budget=2000), 970, explicit={"budget"})
    with pytest.raises(RSAError, match="tail 300 does not fit: K\\*tau = 1200 tokens, but 970"):
        fit_to_context(make_config("deployment", tail=300), 970, explicit={"tail"})
    with pytest.raises(RSAError, match="needs 1400 tokens: 970 tokens of context are left"):
        fit_to_context(make_config("deployment", budget=200, tail=300), 970, explicit={"budget", "tail"})
    with pytest.raises(RSAError, match="3 tokens of context are left after the prompt, too few for K=4 tails"):
        fit_to_context(DEPLOYMENT, 3)


def test_without_aggregation_only_the_budget_counts():
    cfg = fit_to_context(make_config("deployment", rounds=0), 970)
    assert cfg.budget == 970 and cfg.tail == DEPLOYMENT.tail
    with pytest.raises(RSAError, match="budget 971 does not fit: 970 tokens"):
        fit_to_context(make_config("deployment", rounds=0, budget=971), 970, explicit={"budget"})


def test_full_chain_rsa_moves_only_the_budget():
    cfg = fit_to_context(make_config("deployment", tail=0), 970, explicit={"tail"})
    assert (cfg.budget, cfg.tail) == (194, 0)  # whole traces: K * beta + beta <= 970


def test_final_aggregation_budget_is_capped_too():
    cfg = fit_to_context(make_config("deployment", selection="final_agg", final_budget=8000), 970)
    assert cfg.final_budget == cfg.budget == 486


def test_llm_solve_fits_the_default_profile_to_a_short_context(tmp_path):
    llm = zaya.load(make_tiny_model_dir(tmp_path / "m", max_position_embeddings=640))  # the template alone is ~480 tokens
    result = llm.solve("What is 1 + 1?", n=2, k=2, rounds=1, seed=0, progress=False)
    assert result.config.budget < DEPLOYMENT.budget and 0 < result.config.tail < DEPLOYMENT.tail
    assert result.requests == 4 and result.context["max_sequence_tokens"] <= 640
    with pytest.raises(RSAError, match="budget 500 does not fit"):
        llm.solve("What is 1 + 1?", n=2, k=2, rounds=1, budget=500, progress=False)
