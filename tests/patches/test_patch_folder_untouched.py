"""The user's model folder is never modified: every file hashed before and after loading with patches,
training a few steps, generating and materializing an overlay."""

from __future__ import annotations

import pytest
import torch
from patchkit import (
    backend,
    folder_digest,
    labels_for,
    on_device,
    padding_masks,
    patched_model,
    source_params,
    token_batch,
)


@pytest.mark.parametrize("source", source_params(upstream=False))
def test_model_folder_is_never_modified(source, model_dir, tmp_path, fresh_plugin_manager):
    folder = model_dir(source)
    before = folder_digest(folder)
    assert "model.safetensors" in before and "modeling_chatglm.py" in before

    ids = token_batch(source.family)
    mask = padding_masks(ids)[1][1]
    with on_device("mlu"):
        mlu = backend("mlu")
        batch = mlu.coerce({"input_ids": ids, "attention_mask": mask, "labels": labels_for(ids, mask)})
        with patched_model(folder, "mlu", "train", product_path=True) as (model, _):
            model.gradient_checkpointing_enable()
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
            for _ in range(2):
                with mlu.compute_context():
                    model(**batch, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    with patched_model(folder, "cpu", "infer", product_path=True) as (model, _):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)

    from glmport.cli import main

    assert main(["patch", "materialize", str(folder), str(tmp_path / "overlay"), "--backend", "mlu",
                 "--mode", "train"]) == 0
    assert folder_digest(folder) == before
