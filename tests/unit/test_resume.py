"""Where a run starts: yes / N / no / nothing, decided before any model is loaded."""

from __future__ import annotations

import pytest

from glmport.errors import ResumeError
from glmport.train.outputs import CHECKPOINT_MARKER as MARKER
from glmport.train.resume import plan_resume


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


def _manifested(output, step, payload=b"weights"):
    from glmport.train.checkpoints import write_manifest

    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    write_manifest(folder, step, run_fingerprint=None, history=[])
    return folder


def test_rotation_keeps_complete_checkpoints_only_and_never_the_newest(tmp_path):
    from glmport.train.checkpoints import rotate

    out = tmp_path / "out"
    for step in (2, 4, 6):
        _manifested(out, step)
    (out / "checkpoint-6.incomplete").mkdir()  # set aside by an earlier crash: not a checkpoint
    checkpoint(out, 8, complete=False)  # being written: not complete yet, not counted, not deleted
    assert rotate(out, 1) == [out / "checkpoint-2", out / "checkpoint-4"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-6.incomplete", "checkpoint-8"]
    _manifested(out, 10)
    assert rotate(out, 1, keep=out / "checkpoint-6") == []  # the best model stays; the newest too
    assert rotate(out, None) == []


def test_verify_names_missing_truncated_and_changed_files(tmp_path):
    from glmport.train.checkpoints import verify

    out = tmp_path / "out"
    folder = _manifested(out, 2)
    assert verify(folder) == []
    (folder / "adapter_model.safetensors").write_bytes(b"weightz")
    assert verify(folder) == ["adapter_model.safetensors has changed since it was written (sha256 differs)"]
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    assert verify(folder) == ["adapter_model.safetensors has 1 bytes, the manifest says 7"]
    (folder / "adapter_model.safetensors").unlink()
    assert verify(folder) == ["adapter_model.safetensors is missing"]
    (folder / MARKER).write_text("{not json")
    assert verify(folder)[0].startswith(f"{MARKER} is unreadable")


def test_yes_skips_a_corrupt_checkpoint_and_n_refuses_it(tmp_path):
    out = tmp_path / "out"
    _manifested(out, 2)
    bad = _manifested(out, 4)
    (bad / "adapter_model.safetensors").write_bytes(b"w")
    with pytest.raises(ResumeError, match=r"RESUME 4: .*checkpoint-4 is corrupt: adapter_model.safetensors has 1 bytes"):
        plan_resume(out, "4")
    plan = plan_resume(out, "yes")
    assert plan.checkpoint == out / "checkpoint-2" and plan.step == 2
    assert any("checkpoint-4 is corrupt" in note for note in plan.notes)
    assert (out / "checkpoint-4.corrupt").is_dir()


def test_a_changed_run_is_refused_unless_forced_and_a_changed_model_never(tmp_path):
    from glmport.train.checkpoints import Fingerprint, write_manifest

    out = tmp_path / "out"
    folder = out / "checkpoint-2"
    folder.mkdir(parents=True)
    recorded = Fingerprint({"training_args.learning_rate": 5e-3, "peft_config": {"r": 4}}, {"data": "aa"})
    write_manifest(folder, 2, run_fingerprint=recorded, history=[])
    same = Fingerprint(dict(recorded.settings), dict(recorded.hashes))
    assert plan_resume(out, "yes", run_fingerprint=same).checkpoint == folder
    lr = Fingerprint({**recorded.settings, "training_args.learning_rate": 1e-3}, dict(recorded.hashes))
    with pytest.raises(ResumeError, match=r"training_args.learning_rate: 0.005 -> 0.001[\s\S]*--force-resume"):
        plan_resume(out, "yes", run_fingerprint=lr)
    forced = plan_resume(out, "yes", run_fingerprint=lr, force=True)
    assert forced.checkpoint == folder and "--force-resume" in forced.notes[-1]
    rank = Fingerprint({**recorded.settings, "peft_config": {"r": 8}}, dict(recorded.hashes))
    with pytest.raises(ResumeError, match="weights do not fit this run"):
        plan_resume(out, "yes", run_fingerprint=rank, force=True)
    with pytest.raises(ResumeError, match="past training_args.max_steps 1"):
        plan_resume(out, "yes", run_fingerprint=same, max_steps=1)


def test_qlora_is_part_of_the_fingerprint_and_plain_runs_keep_theirs(tmp_path):
    """Resuming a 4-bit QLoRA run on a full-precision base (or the other way) trains other numbers: the
    fingerprints differ. A run without quantization fingerprints as it did before the setting existed."""
    from glmport.config import read_run_config
    from glmport.train.checkpoints import fingerprint

    (tmp_path / "train.jsonl").write_text('{"conversations": [{"role": "user", "content": "q"}]}\n')
    (tmp_path / "run.yaml").write_text("data_config: {train_file: train.jsonl}\nmax_input_length: 8\n"
                                       "max_output_length: 8\ntraining_args: {output_dir: out}\n"
                                       "peft_config: {peft_type: LORA, task_type: CAUSAL_LM, r: 4}\n")

    def settings(*overrides):
        config, problems = read_run_config(tmp_path / "run.yaml", list(overrides), data_dir=tmp_path)
        assert [p for p in problems if "quantization" in str(p)] == []
        return fingerprint(config).settings

    plain, qlora = settings(), settings("glmport.quantization=4bit")
    assert "quantization" not in plain and settings("glmport.quantization=none") == plain
    assert qlora == {**plain, "quantization": "4bit"}
