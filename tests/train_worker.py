"""Helper run under ``torchrun`` by tests/test_train_parity.py (not a test module itself).

For each case it builds the tiny model (seed 0), shards it with FSDP2 over the ranks, takes one
``train_step`` on this rank's share of a fixed global batch, and saves (rank 0) the full
gradients, the parameters after the AdamW step, embeddings of fixed inputs from the sharded model,
and an exported single-file checkpoint.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from sparo_fast_training import checkpoint as ckpt
from sparo_fast_training import distributed as D
from sparo_fast_training import fsdp, optim
from sparo_fast_training.loop import make_loss, train_step


def global_batch(n, image_size=64, ctx=32, seed=123):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, 49406, (n, ctx), generator=g)
    lengths = torch.randint(3, ctx, (n,), generator=g)
    tokens[:, 0] = 49406
    for i, L in enumerate(lengths.tolist()):
        tokens[i, L] = 49407
        tokens[i, L + 1:] = 0
    return images, tokens


def main():
    out_dir, model_name, cases, seed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    info = D.init("cpu")
    torch.set_num_threads(1)
    from sparo_fast.clip import create_model

    for case in cases:
        k, b = case["accum"], case["batch"]
        torch.manual_seed(0)
        model = create_model(model_name, fused=case.get("fused", True), output_dict=True)
        fsdp.shard_model(model, info.device, info.world_size, "fp32", case.get("grad_checkpointing", False))
        opt = optim.create_optimizer(model, lr=case["lr"], wd=0.1)
        loss_fn = make_loss(case["local_loss"], case["gather_with_grad"], info.rank, info.world_size)
        images, tokens = global_batch(info.world_size * k * b, seed=seed)
        # rank r, micro-batch j: rows [(r * k + j) * b, (r * k + j + 1) * b)
        micro = [(images[(info.rank * k + j) * b:(info.rank * k + j + 1) * b],
                  tokens[(info.rank * k + j) * b:(info.rank * k + j + 1) * b]) for j in range(k)]
        loss, gnorm = train_step(model, micro, loss_fn, opt)
        dist.all_reduce(loss)  # with local loss each rank holds the loss of its own rows
        loss /= info.world_size
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (the logit scale is plain)
        grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            emb_img = model.encode_image(images[:4], normalize=True)
            emb_txt = model.encode_text(tokens[:4], normalize=True)
        export = os.path.join(out_dir, f"{case['name']}_export.pt")
        ckpt.export(export, model, {"name": model_name})
        if info.rank == 0:
            torch.save({"loss": loss, "grad_norm": gnorm, "grads": grads, "params": params, "emb_img": emb_img,
                        "emb_txt": emb_txt}, os.path.join(out_dir, f"{case['name']}.pt"))
        dist.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
