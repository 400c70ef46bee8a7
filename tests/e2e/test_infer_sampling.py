"""Decoding: greedy by default, sampling with --temperature above 0, repeatable with --seed."""

from __future__ import annotations

import json

from glmport.testing import ok, run_cli


def _reply(model, *args) -> dict:
    return json.loads(ok(run_cli("infer", model, "--prompt", "hello", "--max-new-tokens", "12", "--json", "-q",
                                 *args)).stdout)


def test_greedy_by_default_sampling_with_a_seed_repeats(models):
    model = models["native"]
    greedy = _reply(model)
    assert _reply(model, "--top-p", "0.1", "--seed", "7")["reply"] == greedy["reply"]  # sampling flags need a temperature
    sampled = [_reply(model, "--temperature", "1.5", "--top-p", "1.0", "--seed", str(seed))["reply"] for seed in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]  # the same seed, the same reply
    assert len(set(sampled + [greedy["reply"]])) > 1  # a random tiny model at temperature 1.5 does not repeat itself
