"""Two CPU processes (gloo) see the same contrastive loss and gradients as one process on the whole batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_CLIP

from mmclin.models.clip import CLIPModule

BATCH = 8


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(1, 49000, (BATCH, 16), generator=g)


def _module() -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(model_config=TINY_CLIP, local_loss=False, gather_with_grad=True)


def _grad(module: CLIPModule) -> torch.Tensor:
    return module.model.visual.conv1.weight.grad.clone()


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = _module()
    module.configure_loss(rank, world)
    images, texts = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = module.contrastive_loss(images[part], texts[part])
    loss.backward()
    grad = _grad(module)
    dist.all_reduce(grad)  # DDP averages gradients over processes
    out[rank] = (loss.detach(), grad / world)
    dist.destroy_process_group()


def test_two_process_loss_and_gradients_equal_single_process():
    module = _module()
    module.configure_loss()
    images, texts = _data()
    loss = module.contrastive_loss(images, texts)
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in range(2):
        rank_loss, rank_grad = results[rank]
        torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank_grad, _grad(module), rtol=1e-4, atol=1e-6)
