"""The parts of `glmport bench` and of packed training that need no model: shapes, FLOPs, workloads, the
memory estimate's parameter count, packing and its mask, the chunked label-row loss, argument errors."""

from __future__ import annotations

import pytest
import torch

from glmport.bench.estimate import estimate_peak, parameter_count
from glmport.bench.flops import StepWork, linear_params, model_flops
from glmport.bench.shapes import SHAPES, resolve_shape
from glmport.bench.workloads import make_samples
from glmport.data.packing import PackingCollator, block_diagonal_mask, pack_rows, segment_ids
from glmport.testing import ok, run_cli


def test_linear_parameters_match_the_performance_notes():
    """N of the notes' section 3, worked there by hand for both real shapes."""
    assert linear_params(SHAPES["chatglm3-6b"]) == 5_976_883_200
    assert linear_params(SHAPES["glm-4-9b"]) == 8_778_678_272
    assert parameter_count(SHAPES["chatglm3-6b"]) == 6_243_584_000  # ChatGLM3-6B's published parameter count


def test_lora_flops_per_token_match_the_notes():
    """ChatGLM3-6B LoRA at s = 1024: 23.91 (4N) + 0.70 (attention) GFLOP per token, adapters aside (notes' table)."""
    work = StepWork(tokens=1024, squares=1024 * 1024, label_rows=0, padded_tokens=1024, head_rows=1024)
    per_token = model_flops(SHAPES["chatglm3-6b"], "lora", work) / 1024
    assert abs(per_token / 1e9 - (23.91 + 0.70)) < 0.01


def test_workloads_follow_their_definitions_and_are_seeded():
    w1 = make_samples("W1", 200, vocab_limit=1000, seed=3)
    assert w1 == make_samples("W1", 200, vocab_limit=1000, seed=3)
    for s in w1:
        prompt = s["labels"].count(-100)
        assert 20 <= prompt <= 60 and 60 <= len(s["input_ids"]) - prompt <= 160
        assert s["labels"][prompt:] == s["input_ids"][prompt:]
        assert all(3 <= t < 1000 for t in s["input_ids"])
    assert all(64 <= len(s["input_ids"]) <= 2048 for s in make_samples("W2", 300, vocab_limit=1000, seed=0))
    assert all(len(s["input_ids"]) <= 512 for s in make_samples("W3", 3, vocab_limit=1000, seed=0, max_length=512))


def test_shape_from_a_config_file(tmp_path):
    (tmp_path / "config.json").write_text('{"num_layers": 3, "hidden_size": 256, "num_attention_heads": 2, '
                                          '"multi_query_group_num": 1, "ffn_hidden_size": 512, '
                                          '"padded_vocab_size": 151552, "seq_length": 4096}')
    shape = resolve_shape(str(tmp_path))
    assert (shape.family, shape.num_layers, shape.head_dim, shape.vocab) == ("glm4", 3, 128, 151552)


def test_estimate_grows_with_tokens_and_shrinks_with_checkpointing():
    shape = SHAPES["chatglm3-6b"]
    small, big = (estimate_peak(shape, tokens=t)["peak_bytes"] for t in (2048, 8192))
    assert big > small
    assert estimate_peak(shape, tokens=8192, checkpointing="full")["peak_bytes"] < big
    assert estimate_peak(shape, method="sft", tokens=2048)["trainable_parameters"] == parameter_count(shape)


def test_first_fit_packing_keeps_order_and_capacity():
    assert pack_rows([5, 3, 4, 2, 9], 8) == [[0, 1], [2, 3], [4]]


def test_packed_rows_restart_positions_and_mask_each_samples_first_label():
    features = [{"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
                {"input_ids": [20, 21], "labels": [20, 21]},
                {"input_ids": [30, 31, 32, 33], "labels": [-100, -100, 32, 33]}]
    batch = PackingCollator(pad_token_id=0, row_tokens=5)(features)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_block_diagonal_mask_is_causal_within_samples_only():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    segments = segment_ids(positions, mask)
    assert segments.tolist() == [[1, 1, 1, 2, 2, 0]] and segments.dtype == torch.int32
    blocked = block_diagonal_mask(segments)[0, 0]
    for q in range(6):
        for k in range(6):
            visible = k <= q and segments[0, q] == segments[0, k]
            assert bool(blocked[q, k]) == (not visible), (q, k)


def _loss_and_grads(rows, targets, head, chunk, monkeypatch):
    from glmport.train import loss

    monkeypatch.setattr(loss, "CHUNK_ROWS", chunk)
    hidden = rows.clone().requires_grad_(True)
    head.zero_grad()
    saved = []

    def keep(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        total, count = loss.label_loss_sum(hidden, targets, head)
    total.backward()
    weight = head.weight if isinstance(head, torch.nn.Linear) else head[0].weight
    return total.detach(), hidden.grad, weight.grad.clone(), saved


@pytest.mark.parametrize("kind", ["linear", "called-module"])
def test_chunked_label_loss_is_exact_and_keeps_one_chunk_of_logits(monkeypatch, kind):
    """A plain Linear head: gradients computed chunk by chunk in the forward, no logits kept for backward.
    A head that must be called (peft, hooks, ZeRO-3): each chunk recomputed in backward when there are several."""
    torch.manual_seed(0)
    vocab, width = 1000, 16
    head = torch.nn.Linear(width, vocab, bias=False)
    if kind == "called-module":
        head = torch.nn.Sequential(head)
    rows = torch.randn(1, 65, width)
    targets = torch.randint(0, vocab, (1, 65))
    targets[0, :10] = -100
    whole = _loss_and_grads(rows, targets, head, 4096, monkeypatch)
    chunked = _loss_and_grads(rows, targets, head, 8, monkeypatch)
    for a, b in zip(whole[:3], chunked[:3]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    if kind == "linear":  # the rows' and the weight's gradients are kept, never logits
        assert all(shape[-1] != vocab for shape in whole[3] + chunked[3])
        assert torch.Size([55, width]) in chunked[3] and torch.Size([vocab, width]) in chunked[3]
    else:
        assert max(shape.numel() for shape in whole[3]) >= 54 * vocab  # one chunk: every label row's logits kept
        assert max(shape.numel() for shape in chunked[3]) < 8 * vocab + 1  # recomputed per chunk


def test_bench_refuses_few_steps_without_the_flag_and_unknown_shapes():
    result = ok(run_cli("bench", "--steps", "5"), exit_code=2)
    assert "--steps" in result.stderr and "--allow-few-steps" in result.stderr
    result = ok(run_cli("bench", "--shape", "no-such-shape"), exit_code=2)
    assert "--shape" in result.stderr


def test_bench_estimate_prints_terms_without_a_model(tmp_path):
    result = ok(run_cli("bench", "--estimate", "--shape", "chatglm3-6b", "--tokens-per-step", "8192", "--json"))
    import json

    report = json.loads(result.stdout)
    assert report["tokens_per_micro_batch"] == 8192 and report["peak_gib"] > report["terms"]["weights"] / 2**30


def test_the_glmport_recipe_can_take_smaller_micro_batches():
    """``--micro-batch N`` changes only the recipe measured for glmport, and says so in its change text."""
    from glmport.bench.recipes import REFERENCE, ladder, select

    reference, ours = select("reference", packing=True, micro_batch=4)
    assert reference == REFERENCE
    assert (ours.micro_batch, ours.collator, ours.loss, ours.checkpointing) == (4, "packed", "label-rows", "off")
    assert ours.change.endswith("micro-batches of 4")
    rungs = select("all", packing=True, micro_batch=4)
    assert rungs[:-1] == ladder(True)[:-1] and rungs[-1].micro_batch == 4
    assert select("glmport", packing=True)[0].micro_batch is None  # default: one micro-batch per step


def test_a_micro_batch_that_does_not_divide_the_step_is_refused():
    from glmport.testing import ok, run_cli

    failed = ok(run_cli("bench", "--micro-batch", "5", "--samples-per-step", "16", "--steps", "1",
                        "--allow-few-steps"), exit_code=2)
    assert "--micro-batch: 5 does not divide --samples-per-step 16" in failed.stderr
