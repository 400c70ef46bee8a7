"""The label-row loss equals transformers' own loss; batches pad the way each use needs."""

from __future__ import annotations

import torch

from glmport.train.dataset import Collator
from glmport.train.loss import label_loss_sum, model_loss_sum
from glmport.train.metrics import score_pair, score_texts


def test_label_row_loss_matches_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100], [-100, 9, 9, 9, 9, 9, 1]])
    total, count = label_loss_sum(hidden, labels, head)
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert count == 9 and torch.allclose(total, expected, atol=1e-5)


def test_model_loss_matches_the_models_own_loss(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("tiny-native"))
    batch = Collator(0)([{"input_ids": [64790, 64792, 300, 301, 302], "labels": [-100, -100, -100, 301, 302]},
                         {"input_ids": [64790, 64792, 310, 311], "labels": [-100, -100, 310, 311]}])
    labels = batch.pop("labels")
    total, count, _ = model_loss_sum(model, batch, labels)
    reference = model(**batch, labels=labels).loss
    assert count == 4 and torch.allclose(total / count, reference, atol=1e-5)
    assert model.lm_head.__class__.__name__ == "Linear", "the output layer is put back"


def test_training_batches_pad_right_with_positions():
    batch = Collator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_eval_batches_carry_left_padded_prompts_for_generation():
    batch = Collator(0)([{"prompt_ids": [1, 2], "output_ids": [3]}, {"prompt_ids": [4], "output_ids": [5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, -100, 3], [-100, 5, 6]]
    assert batch["gen_input_ids"].tolist() == [[1, 2], [0, 4]]
    assert batch["gen_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["gen_output_ids"].tolist() == [[3, -100], [5, 6]]


def test_metrics_score_and_empty_predictions_score_zero():
    perfect = score_pair("这款连衣裙很漂亮", "这款连衣裙很漂亮")
    assert perfect["rouge-1"] > 99 and perfect["bleu-4"] > 0.9
    assert score_pair("", "这款连衣裙很漂亮") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    mean = score_texts(["这款连衣裙很漂亮", ""], ["这款连衣裙很漂亮", "白色"])
    assert 49 < mean["rouge-1"] < 51
