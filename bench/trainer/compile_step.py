"""Time one training step of ViT-Tiny-SPARO, eager vs ``--torchcompile`` (the trainer's compile_model:
every residual block and both read-outs compiled with inductor), on the CPU, in one process.

    python bench/trainer/compile_step.py [--batch 32] [--steps 10] [--threads N] [--fused/--reference]

Both variants start from the same weights and take the same (fresh random) batches; compilation
time is reported separately (first steps) and the steady-state step is the median of ``--steps``
timed steps after ``--warmup`` untimed ones. Prints one line per variant and the ratio.
"""
import argparse
import statistics
import time

import torch


def run(compiled: bool, args):
    from sparo_fast.clip import create_model
    from sparo_fast_training import optim
    from sparo_fast_training.loop import make_loss, train_step
    from sparo_fast_training.trainer import compile_model

    torch.manual_seed(0)
    model = create_model(args.model, fused=args.fused, output_dict=True)
    if compiled:
        torch._dynamo.reset()
        compile_model(model)
    opt = optim.create_optimizer(model, lr=1e-4, wd=0.1)
    loss_fn = make_loss(False, False, 0, 1)
    g = torch.Generator().manual_seed(1)
    size, ctx = model.visual.image_size, model.context_length
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size, generator=g)
    tokens = torch.randint(1, 49406, (args.batch, ctx), generator=g)
    tokens[:, 0], tokens[:, ctx // 2] = 49406, 49407
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        train_step(model, [(images, tokens)], loss_fn, opt)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        train_step(model, [(images, tokens)], loss_fn, opt)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-Tiny-SPARO")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference", dest="fused", action="store_false", help="reference read-out backend")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'fused' if args.fused else 'reference'} read-out")
    res = {}
    for compiled in (False, True):
        first, med, best = run(compiled, args)
        res[compiled] = med
        print(f"{'compiled' if compiled else 'eager   '}: first {args.warmup} steps {first:.2f} s, "
              f"step median {1e3 * med:.1f} ms (min {1e3 * best:.1f} ms) over {args.steps}")
    print(f"compiled / eager step time: {res[True] / res[False]:.2f}")


if __name__ == "__main__":
    main()
