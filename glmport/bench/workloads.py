"""The synthetic workloads of the performance notes (section 6), as seeded token-id samples.

Loss is on the response only: prompt positions carry the label -100. Token ids are drawn from the
ordinary (non-special) part of the vocabulary.

* W1 "AdvertiseGen-like": prompt U[20, 60], response U[60, 160] tokens.
* W2 "chat SFT": total length log-normal with median 512, clipped to [64, 2048], prompt fraction U[0.3, 0.6].
* W3 "long": total length U[2048, 8192], prompt fraction U[0.3, 0.6].
"""

from __future__ import annotations

import math
import random

WORKLOADS = {
    "W1": "AdvertiseGen-like: prompt U[20,60] + response U[60,160] tokens",
    "W2": "chat SFT: log-normal length, median 512, clipped to [64, 2048]; prompt fraction U[0.3,0.6]",
    "W3": "long: length U[2048, 8192]; prompt fraction U[0.3,0.6]",
}


def _lengths(workload: str, rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, response tokens) of one sample."""
    if workload == "W1":
        return rng.randint(20, 60), rng.randint(60, 160)
    if workload == "W2":
        total = int(min(max(rng.lognormvariate(math.log(512), 0.6), 64), 2048))
    elif workload == "W3":
        total = rng.randint(2048, 8192)
    else:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    prompt = int(total * rng.uniform(0.3, 0.6))
    return prompt, total - prompt


def make_samples(workload: str, count: int, *, vocab_limit: int, seed: int, max_length: int | None = None) -> list[dict]:
    """``count`` samples ``{"input_ids", "labels"}`` (labels aligned with the inputs; the loss shifts them).
    ``max_length`` truncates the response, as the training path's length limits do."""
    rng = random.Random(f"{workload}-{seed}")
    samples = []
    for _ in range(count):
        prompt, response = _lengths(workload, rng)
        if max_length is not None and prompt + response > max_length:
            prompt = min(prompt, max_length // 2)
            response = max_length - prompt
        ids = [rng.randrange(3, vocab_limit) for _ in range(prompt + response)]
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples
