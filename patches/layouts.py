"""Which remote-code families share a layout, for the patches that differ by it (a leaf module: the patch
modules import it, and it imports nothing of theirs)."""

# [seq, batch, heads, head_dim] tensors and their own P-Tuning v2 prefix encoder (ChatGLMModel.get_prompt):
# ChatGLM2-6B and ChatGLM3-6B. GLM-4 is batch-first and has no prefix encoder.
SEQUENCE_FIRST = ("chatglm2", "chatglm3")
