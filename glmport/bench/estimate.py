"""Peak memory of glmport's training step, predicted from the shape alone (nothing is allocated).

An analytic model, term by term, of what the step holds at its peak (the start of the backward pass):

* weights: every parameter in the load dtype (fp32 for full SFT, whose half precision comes from autocast,
  plus a bf16 copy autocast keeps of each weight while the forward runs). QLoRA (``quantization`` 4bit/8bit):
  the blocks' linear weights in bitsandbytes' format (nf4: half a byte, plus one double-quantized absmax byte
  per 64 weights and an fp32 constant per 256 of those; int8: a byte), everything else (embedding, output
  layer, norms, biases) in fp32, as peft's ``prepare_model_for_kbit_training`` upcasts it; the backward
  working set holds one linear weight dequantized to the compute dtype;
* trainable state: fp32 parameters of the method (LoRA matrices, prefix encoder, or all weights for SFT),
  their gradients and AdamW's two moments: 12 bytes each on top of the fp32 parameter;
* activations saved for backward, per token and layer. Counted with ``saved_tensors_hooks`` on the
  remote-code layer (glmport's patches applied, SDPA attention with key/value expanded to all heads as the
  remote code does): LoRA and P-Tuning (frozen linears save no inputs) keep ``3f + 7h`` elements (the fused
  up-projection's 2f output and the SwiGLU product f, two norm inputs, the LoRA input, q/k/v and the
  attention output); full SFT adds the inputs of the frozen-no-more linears, ``4f + 11h``. With full
  checkpointing only each layer's input ``h`` is kept, plus one layer's worth while it is recomputed; with
  selective checkpointing (the attention cores recomputed) each layer no longer keeps the attention output
  ``h`` that SDPA saved;
* the label-row loss (``glmport.train.loss``, fused): no logits survive to the backward pass, only the
  gradient of the label rows (label rows x hidden, in the activation dtype) and, where the output layer
  trains (SFT), its fp32 weight gradient; while the loss runs in the forward pass, one chunk of fp32
  logits (``CHUNK_ROWS`` rows) and its gradient exist (counted in the working set);
* attention scores, only where attention runs SDPA's math path with a dense mask (``attention="masked"``:
  a CPU, or packed rows without a variable-length kernel): fp32 probabilities ``heads x row²`` per row and
  layer, kept for backward, plus their gradient; under selective or full checkpointing only the layer being
  recomputed has them; fused kernels (flash, varlen) keep none;
* a working set: the larger of the gradient flowing through one layer in the backward pass (``2f + 2h`` per
  token) and the fused loss's two fp32 chunks of logits in the forward pass.

Lengths come from the workload's own generator (the mean of a few thousand seeded samples). The estimate is
checked against peaks measured by ``glmport bench`` (docs/performance.md lists where, and by how much).
"""

from __future__ import annotations

import statistics

from glmport.bench.flops import linear_params
from glmport.bench.workloads import make_samples

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}  # per weight of a quantized linear


def parameter_count(shape) -> int:
    """All parameters: the linears, the embedding, qkv bias and the norms."""
    h, g, d = shape.hidden_size, shape.kv_groups, shape.head_dim
    per_layer_extra = (h + 2 * g * d) + 2 * h  # qkv bias, two RMSNorm weights
    return linear_params(shape) + shape.vocab * h + shape.num_layers * per_layer_extra + h


def trainable_count(shape, method: str, *, lora_rank: int = 8, prefix: int = 128) -> int:
    h, g, d = shape.hidden_size, shape.kv_groups, shape.head_dim
    if method == "sft":
        return parameter_count(shape)
    if method == "ptuning":  # ChatGLM's own prefix encoder: an embedding of prefix x (layers x 2 x kv heads x dim)
        return prefix * shape.num_layers * 2 * g * d
    return shape.num_layers * lora_rank * (h + (h + 2 * g * d))  # r x (d_in + d_out) on query_key_value


def workload_lengths(workload: str, seed: int = 0, count: int = 4000) -> tuple[float, float]:
    """(mean tokens, mean label tokens) per sample of ``workload``."""
    samples = make_samples(workload, count, vocab_limit=100, seed=seed)
    return (statistics.fmean(len(s["input_ids"]) for s in samples),
            statistics.fmean(sum(1 for x in s["labels"] if x != -100) for s in samples))


def estimate_peak(shape, *, method: str = "lora", workload: str = "W1", dtype: str = "auto", tokens: int | None = None,
                  checkpointing: str = "off", samples_per_step: int = 16,
                  lora_rank: int = 8, half_precision: str = "bf16", attention: str = "fused", rows: int = 1,
                  quantization: str = "none") -> dict:
    """The predicted peak (bytes, by term) of one micro-batch of ``tokens`` tokens (default: all samples of a
    step, packed). ``dtype`` auto is what a bf16 device trains in: bf16 base weights (fp32 for SFT); with
    ``quantization`` (4bit/8bit, LoRA only) it is the compute dtype."""
    from glmport.train.loss import CHUNK_ROWS

    if dtype == "auto":
        dtype = "fp32" if method == "sft" else half_precision
    b = BYTES[dtype]
    mean_tokens, mean_labels = workload_lengths(workload)
    if tokens is None:
        tokens = int(round(mean_tokens * samples_per_step))
    label_rows = int(round(tokens * mean_labels / mean_tokens))
    h, f, layers = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    act_b = BYTES[half_precision] if method == "sft" and dtype == "fp32" and half_precision != "fp32" else b

    params = parameter_count(shape)
    weights = params * b
    if method == "sft" and act_b != b:
        weights += params * act_b  # autocast's half-precision copy of each weight during the forward
    dequantized = 0
    if quantization in QUANTIZED_BYTES:
        quantized = linear_params(shape) - shape.vocab * h  # the blocks' linears; the output layer stays as is
        weights = int(quantized * QUANTIZED_BYTES[quantization]) + (params - quantized) * 4
        g, d = shape.kv_groups, shape.head_dim
        dequantized = max(h * (h + 2 * g * d), h * 2 * f) * b  # the largest weight, dequantized for its matmul
    trainable = trainable_count(shape, method, lora_rank=lora_rank)
    state = trainable * (4 + 4 + 8) - (trainable * 4 if method == "sft" else 0)  # SFT's fp32 weights counted above
    per_token_layer = (4 * f + 11 * h) if method == "sft" else (3 * f + 7 * h)
    if checkpointing == "full":
        activations = tokens * layers * h * act_b + tokens * per_token_layer * act_b
    else:
        activations = tokens * layers * per_token_layer * act_b
        if checkpointing == "selective":  # the recomputed attention cores no longer keep their output
            activations -= tokens * layers * h * act_b
    chunk = min(label_rows, CHUNK_ROWS)
    loss = label_rows * h * act_b + (shape.vocab * h * 4 if method == "sft" else 0)
    working = max(tokens * (2 * f + 2 * h) * act_b, 2 * chunk * shape.vocab * 4) + dequantized
    row = tokens / max(rows, 1)
    scored_layers = layers if checkpointing == "off" else 1  # checkpointed: only the layer being recomputed
    scores = 2 * scored_layers * shape.num_attention_heads * tokens * row * 4 if attention == "masked" else 0
    terms = {"weights": weights, "trainable_state": state, "activations": activations, "loss_gradients": loss,
             "attention_scores": int(scores), "backward_working_set": working}
    total = sum(terms.values())
    return {"shape": shape.name, "method": method, "workload": workload, "dtype": dtype, "quantization": quantization,
            "checkpointing": checkpointing, "attention": attention, "rows": rows,
            "tokens_per_micro_batch": tokens, "label_rows": label_rows,
            "parameters": params, "trainable_parameters": trainable, "terms": terms, "peak_bytes": total,
            "above_loaded_model": total - weights, "peak_gib": total / GIB}


def render_estimate(result: dict) -> str:
    lines = [f"estimated peak memory: {result['shape']} shape, {result['method']}, {result['workload']}, "
             f"{_weights(result)}, checkpointing {result['checkpointing']}, "
             f"{result['tokens_per_micro_batch']:,} tokens per micro-batch ({result['label_rows']:,} label rows)"]
    for name, value in result["terms"].items():
        lines.append(f"  {name.replace('_', ' '):<22} {value / GIB:8.2f} GiB")
    lines.append(f"  {'total':<22} {result['peak_gib']:8.2f} GiB")
    return "\n".join(lines)


def _weights(result: dict) -> str:
    if result.get("quantization", "none") == "none":
        return f"{result['dtype']} weights"
    return f"{result['quantization']} weights (QLoRA, {result['dtype']} compute)"
