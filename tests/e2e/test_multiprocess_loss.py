"""The label-row loss under DDP: the output layer trains, and its gradients are the full batch's on every rank.

glmport's loss applies the output layer to the label rows only. Applied after DDP's forward had returned
(as it once was), full SFT failed under ``find_unused_parameters=True``: DDP took the head for unused and
then saw its gradient arrive ("Expected to mark a variable ready only once ... lm_head.weight"). Two gloo
processes here each take half a batch through :func:`glmport.train.loss.model_loss_sum` on a DDP-wrapped
model, both ways DDP can be set up, and every rank must end with the gradient one process computes for the
whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

FIND_UNUSED = (True, False)  # how the Trainer sets DDP up by default, and how glmport does (it has no unused ones)
ROWS = [{"input_ids": [64790, 64792, 300 + i, 301 + i, 302, 303], "labels": [-100, -100, -100, 301 + i, 302, 303]}
        for i in range(4)]


def _batch(rows):
    from glmport.train.dataset import Collator

    batch = Collator(0)(rows)
    return batch, batch.pop("labels")


def _one_rank(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from glmport.train.loss import model_loss_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch, labels = _batch(ROWS[rank * 2:rank * 2 + 2])
        total_labels = sum(int((_batch([row])[1][:, 1:] != -100).sum()) for row in ROWS)
        for find_unused in FIND_UNUSED:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
            for _ in range(2):  # twice: DDP's bookkeeping must hold from one step to the next
                model.zero_grad()
                loss_sum, count, outputs = model_loss_sum(ddp, batch, labels)
                assert count == int((labels[:, 1:] != -100).sum()) and outputs.loss is loss_sum
                (loss_sum / total_labels * world).backward()  # the Trainer's normalization; DDP averages ranks
            grads = {name: p.grad for name, p in model.named_parameters()}
            torch.save(grads, os.path.join(out_dir, f"grads-{find_unused}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_output_layer_gets_the_full_batch_gradient_on_every_rank(models, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from glmport.launch.plan import free_port
    from glmport.train.loss import model_loss_sum

    model_dir = str(models["native"])
    mp.spawn(_one_rank, args=(2, free_port(), model_dir, str(tmp_path)), nprocs=2)

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch, labels = _batch(ROWS)
    loss_sum, count, _ = model_loss_sum(reference, batch, labels)
    (loss_sum / count).backward()
    assert reference.lm_head.weight.grad.abs().sum() > 0
    for find_unused in FIND_UNUSED:
        for rank in range(2):
            grads = torch.load(tmp_path / f"grads-{find_unused}-{rank}.pt")
            for name, param in reference.named_parameters():
                where = f"{name} on rank {rank} (find_unused_parameters={find_unused})"
                assert grads[name] is not None, f"no gradient for {where}"
                assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), where
