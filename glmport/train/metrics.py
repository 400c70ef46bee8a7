"""Generation metrics, as the official demos report them, without their crashes.

ROUGE-1/2/L: F-measure x 100 over jieba words (``rouge_chinese``). BLEU-4: NLTK sentence BLEU with
smoothing method 3 over jieba words, on the 0-1 scale the ChatGLM3 / GLM-4 demos use (ChatGLM-6B's
character-level x100 variant is a different number). Differences from upstream: an empty prediction or
reference scores 0 instead of raising (``rouge_chinese`` raises ``ValueError`` on empty hypotheses), and
-100 padding in labels is dropped before decoding.
"""

from __future__ import annotations

import numpy as np

from glmport.errors import GlmportError

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _require():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise GlmportError(
            f"generation metrics need the metrics extra ({exc.name} is missing): pip install 'glmport[metrics]', "
            "or set training_args.predict_with_generate: false"
        ) from None
    jieba.setLogLevel(60)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def require_metrics() -> None:
    """Fail now, saying what to install, when the metric libraries are missing (before a model loads)."""
    _require()


def score_pair(prediction: str, reference: str, tools=None) -> dict[str, float]:
    jieba, Rouge, sentence_bleu, SmoothingFunction = tools or _require()
    pred_words = [w for w in jieba.cut(prediction.strip()) if w.strip()]
    ref_words = [w for w in jieba.cut(reference.strip()) if w.strip()]
    if not pred_words or not ref_words:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    scores = Rouge().get_scores(" ".join(pred_words), " ".join(ref_words))[0]
    result = {name: scores[name]["f"] * 100 for name in ("rouge-1", "rouge-2", "rouge-l")}
    result["bleu-4"] = sentence_bleu([ref_words], pred_words, smoothing_function=SmoothingFunction().method3)
    return result


def score_texts(predictions: list[str], references: list[str]) -> dict[str, float]:
    tools = _require()
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in score_pair(prediction, reference, tools).items():
            totals[name] += value
    count = max(len(predictions), 1)
    return {name: round(value / count, 4) for name, value in totals.items()}


def decode_predictions(tokenizer, predictions, pad_token_id: int) -> list[str]:
    """Generated ids (rows padded with -100 or the pad id) as the texts the metrics score; ``glmport eval``
    decodes with this too, so that its numbers are training's."""
    predictions = np.where(np.asarray(predictions) < 0, pad_token_id, predictions)
    return tokenizer.batch_decode(predictions.tolist(), skip_special_tokens=True)


def decode_references(tokenizer, references) -> list[str]:
    """Reference ids (rows right-padded with -100) as texts, -100 dropped."""
    rows = references.tolist() if hasattr(references, "tolist") else references
    return [tokenizer.decode([t for t in row if t >= 0], skip_special_tokens=True) for row in rows]


def make_compute_metrics(tokenizer, pad_token_id: int):
    """A ``compute_metrics`` for the Trainer: decodes generated ids and references, then scores them."""
    _require()

    def compute_metrics(eval_prediction) -> dict[str, float]:
        pred_texts = decode_predictions(tokenizer, eval_prediction.predictions, pad_token_id)
        ref_texts = decode_references(tokenizer, eval_prediction.label_ids)
        return score_texts(pred_texts, ref_texts)

    return compute_metrics
