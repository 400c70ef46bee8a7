"""Where a run starts: yes / N / no / nothing, decided before any model is loaded."""

from __future__ import annotations

import pytest

from glmport.errors import ResumeError
from glmport.train.resume import MARKER, plan_resume


def checkpoint(output, step, complete=True):
    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_text("x")
    if complete:
        (folder / MARKER).write_text("{}")
    return folder


def test_yes_takes_the_latest_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 5)
    checkpoint(out, 10)
    checkpoint(out, 15, complete=False)  # a crash while saving
    plan = plan_resume(out, "yes")
    assert plan.checkpoint == out / "checkpoint-10"
    assert (out / "checkpoint-15.incomplete").is_dir() and not (out / "checkpoint-15").exists()


def test_yes_on_a_first_run_starts_fresh(tmp_path):
    assert plan_resume(tmp_path / "new", "YES").checkpoint is None


def test_a_step_number_must_exist(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 5)
    assert plan_resume(out, "5").checkpoint == out / "checkpoint-5"
    with pytest.raises(ResumeError, match=r"RESUME 7: .*checkpoint-7 does not exist[\s\S]*checkpoint-5"):
        plan_resume(out, "7")
    with pytest.raises(ResumeError, match="positive number"):
        plan_resume(out, "0")
    with pytest.raises(ResumeError, match="expected yes, no or a checkpoint step"):
        plan_resume(out, "latest")


def test_no_really_restarts_and_keeps_the_old_run(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 5)
    (out / "run_summary.json").write_text("{}")
    plan = plan_resume(out, "no")
    assert plan.checkpoint is None and "superseded-" in plan.notes[0]
    archived = next(out.glob("superseded-*"))
    assert (archived / "checkpoint-5" / MARKER).is_file() and (archived / "run_summary.json").is_file()
    assert not (out / "checkpoint-5").exists()


def test_nothing_given_refuses_to_mix_with_an_earlier_run(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 5)
    with pytest.raises(ResumeError, match=r"already holds a run[\s\S]*--resume yes"):
        plan_resume(out, None, where="--resume")
    assert plan_resume(tmp_path / "fresh", None).checkpoint is None


def test_upstream_checkpoints_without_marker_count_when_trainer_state_is_there(tmp_path):
    out = tmp_path / "out"
    folder = checkpoint(out, 500, complete=False)
    (folder / "trainer_state.json").write_text("{}")
    assert plan_resume(out, "yes").checkpoint == folder


def test_nothing_given_also_protects_a_finished_run_without_checkpoints(tmp_path):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "run_summary.json").write_text("{}")
    with pytest.raises(ResumeError, match=r"already holds a run \(found: final, run_summary.json\)"):
        plan_resume(out, None)


def test_resuming_an_earlier_step_moves_the_later_checkpoints_aside(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        checkpoint(out, step)
    plan = plan_resume(out, "2")
    assert plan.checkpoint == out / "checkpoint-2" and "after step 2" in plan.notes[1]
    archived = next(out.glob("superseded-*"))
    assert sorted(p.name for p in archived.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert plan_resume(out, "yes").checkpoint == out / "checkpoint-2"
