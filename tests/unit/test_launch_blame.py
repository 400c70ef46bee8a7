"""Which rank the launcher blames when several ranks of a node failed (glmport.launch.agent.describe_failure),
with torch's own failure records: the rank that failed on its own comes first, a rank the agent stopped
afterwards (SIGTERM) or one that only relayed the failure comes after it, whatever their timestamps."""

import json
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from glmport.launch.agent import describe_failure


def failure(tmp_path, local_rank, exitcode, message=None, timestamp=0):
    error_file = tmp_path / f"error-{local_rank}.json"
    if message is not None:  # what torchrun's error handler writes for a rank that raised
        error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": str(timestamp)}}}))
    record = ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(error_file))
    record.timestamp = timestamp
    return record


def blamed(tmp_path, *failures):
    (tmp_path / "run" / "attempt_0" / "1").mkdir(parents=True)
    (tmp_path / "run" / "attempt_0" / "1" / "stderr.log").write_text("loading\nterminate called without an active exception\n")
    error = ChildFailedError("glmport", {f.local_rank: f for f in failures})
    return describe_failure(error, tmp_path)


def test_a_rank_that_crashed_is_blamed_not_the_one_the_agent_stopped_before_its_record(tmp_path):
    # The agent's SIGTERM to rank 0 can carry an earlier timestamp than rank 1's own SIGABRT.
    message, code = blamed(tmp_path, failure(tmp_path, 0, -signal.SIGTERM, timestamp=1),
                           failure(tmp_path, 1, -signal.SIGABRT, timestamp=2))
    assert message.startswith("rank 1 (local rank 1 on this node, pid 1001) was killed by SIGABRT"), message
    assert "rank 0 failed too" in message
    assert "| terminate called without an active exception" in message
    assert code == 1  # a crash, not an interruption


@pytest.mark.parametrize("relayed", ["RankFailed: rank 1 failed: bad record", "DistBackendError: Connection closed by peer"])
def test_an_error_beats_a_relay_and_a_stop(tmp_path, relayed):
    message, code = blamed(tmp_path, failure(tmp_path, 0, 1, relayed, timestamp=1),
                           failure(tmp_path, 2, -signal.SIGTERM, timestamp=1),
                           failure(tmp_path, 1, 2, "ConfigError: data/train.json line 3: not JSON", timestamp=3))
    assert message.startswith("rank 1 (local rank 1 on this node, pid 1001) exited with status 2: "
                              "data/train.json line 3: not JSON"), message
    assert "ranks 2, 0 failed too" in message
    assert code == 2


def test_only_stopped_ranks_mean_the_run_was_interrupted(tmp_path):
    message, code = blamed(tmp_path, failure(tmp_path, 1, -signal.SIGTERM, timestamp=2),
                           failure(tmp_path, 0, -signal.SIGINT, timestamp=1))
    assert message.startswith("rank 0 (local rank 0 on this node, pid 1000) was killed by SIGINT"), message
    assert code == 130
