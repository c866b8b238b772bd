"""Train a small ResNet-style CNN with GERNE on a biased dataset, end to end.

Each step draws a biased batch B_b (class-balanced) and a less-biased batch B_lb (Eq. 4, mixing
factor c) with gerne_kernels' TwoBatchSampler, and steps along (1 + beta) g_lb - beta g_b.
Shows: the three gradient modes (stash / memory-lean / one-backward), AMP (bf16 or fp16 with
GradScaler), channels_last, clipping of the extrapolated gradient, DDP (--world-size N: N
processes, gloo on the CPU, nccl on GPUs), checkpoints that resume exactly, a warmup + cosine LR
schedule, gradient statistics, and group metrics (GBA, WGA) at the end. It uses gerne_kernels as
installed (`pip install .`), nothing else.

    python examples/train.py --data synthetic --steps 300
    python examples/train.py --data colored-mnist --minority 0.01 --amp bf16 --mode lean
    python examples/train.py --mode one-backward --channels-last --max-grad-norm 1.0
    python examples/train.py --world-size 2 --checkpoint run.pt   # resumes if run.pt exists
"""

import argparse
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gerne_kernels as gk
from gerne_kernels import BetaBounds, TwoBatchSampler, beta_bounds
from gerne_kernels.metrics import group_metrics


# ------------------------------------------------------------------------------------------------
# Data: (x, y, a) tensors; the attribute a is a shortcut that predicts y in the training split.

PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1]])


def synthetic(split, minority, n_per_class, seed, size=12):
    """Four classes: a faint square in quadrant y. Four attributes: the background tint a.
    Train: a = y except for a `minority` share of each class (at least one sample in every
    group), spread evenly over the other tints; test: every (y, a) group equally often."""
    g = torch.Generator().manual_seed(seed * 31 + (split == "test"))
    k = len(PALETTE)
    y = torch.arange(k).repeat_interleave(n_per_class)
    if split == "test":
        a = torch.arange(k).repeat(n_per_class)
    else:
        conflicting = max(k - 1, round(minority * n_per_class))
        shift = torch.zeros(n_per_class, dtype=torch.long)
        shift[:conflicting] = torch.arange(conflicting) % (k - 1) + 1
        a = (y + shift.repeat(k)) % k
    x = 0.5 * PALETTE[a][:, :, None, None] + 0.3 * torch.randn(len(y), 3, size, size, generator=g)
    half = size // 2
    for i in range(len(y)):
        r, c = divmod(int(y[i]), 2)
        dr, dc = torch.randint(0, half - 3, (2,), generator=g).tolist()
        x[i, :, r * half + dr:r * half + dr + 4, c * half + dc:c * half + dc + 4] += 0.4
    return x, y, a


def load_data(args):
    if args.data == "colored-mnist":
        from gerne_kernels.datasets import colored_mnist
        train = colored_mnist("train", args.minority, source="digits", seed=args.seed)
        test = colored_mnist("test", args.minority, source="digits", seed=args.seed)
        return tuple(train), tuple(test)
    return (synthetic("train", args.minority, args.n_per_class, args.seed),
            synthetic("test", args.minority, max(4, args.n_per_class // 4), args.seed))


# ------------------------------------------------------------------------------------------------
# Model: a small ResNet

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------
# Training

def build_optimizer(args, model, bounds, scaler):
    common = dict(beta=args.beta, backend=args.backend, grad_scaler=scaler,
                  track_statistics=args.statistics, max_grad_norm=args.max_grad_norm)
    if bounds is not None:
        common["beta_bounds"] = bounds
    if args.wrapper:  # any torch optimizer, fed the extrapolated gradient
        base = (torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.weight_decay)
                if args.optimizer == "sgd" else
                torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay))
        return gk.GERNEWrapper(base, **common)
    hyper = dict(momentum=0.9) if args.optimizer == "sgd" else {}
    return gk.GERNE(model.parameters(), optimizer=args.optimizer, lr=args.lr,
                    weight_decay=args.weight_decay, **hyper, **common)


def warmup_cosine(total, warmup):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def save_checkpoint(path, step, model, opt, scaler, sched, generator):
    tmp = path + ".tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                "scaler": scaler.state_dict(), "sched": sched.state_dict(),
                "generator": generator.get_state()}, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint


def load_checkpoint(path, device):
    torch.serialization.add_safe_globals([BetaBounds])  # kept in the param groups
    return torch.load(path, map_location=device, weights_only=True)


@torch.no_grad()
def evaluate(model, x, y, a, device, amp_dtype):
    model.eval()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = torch.cat([model(chunk.to(device)).float() for chunk in x.split(512)])
    model.train()
    return group_metrics(logits.argmax(1).cpu(), y, a)


def train(rank, args):
    world = args.world_size
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    (x, y, a), (x_test, y_test, a_test) = load_data(args)
    num_classes = int(y.max()) + 1
    model = SmallResNet(num_classes, args.width).to(device)
    if args.channels_last:  # the fast convolution layout; GERNE updates it in place
        model = model.to(memory_format=torch.channels_last)
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[rank] if device.type == "cuda" else None)

    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    bounds = beta_bounds(y, a, args.c, simplified=True)
    opt = build_optimizer(args, model, bounds, scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, args.warmup))
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # own batches per rank
    sampler_cls = TwoBatchSampler
    sampler = sampler_cls(y, a, args.batch_per_class, args.c, generator=generator)

    start = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = load_checkpoint(args.checkpoint, device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        scaler.load_state_dict(saved["scaler"])
        sched.load_state_dict(saved["sched"])
        generator.set_state(saved["generator"])
        start = saved["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}")

    def forward_loss(indices):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return F.cross_entropy(ddp(x[indices].to(device)), y[indices].to(device))

    for step in range(start, args.steps):
        idx_b, idx_lb = sampler.sample_b(), sampler.sample_lb()
        opt.zero_grad()
        if args.mode == "one-backward":  # one forward of B_b || B_lb, one backward of L_ext
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                both = torch.cat([idx_b, idx_lb])
                losses = F.cross_entropy(ddp(x[both].to(device)), y[both].to(device),
                                         reduction="none")
            loss_b, loss_lb = losses[:len(idx_b)].mean(), losses[len(idx_b):].mean()
            scaler.scale(opt.extrapolated_loss(loss_b, loss_lb)).backward()
        elif args.mode == "stash":  # both backwards all-reduce under DDP
            loss_b = forward_loss(idx_b)
            scaler.scale(loss_b).backward()
            opt.stash_biased()
            loss_lb = forward_loss(idx_lb)
            scaler.scale(loss_lb).backward()
        else:  # lean: -beta g_b + (1 + beta) g_lb accumulates in .grad, one all-reduce
            with ddp.no_sync() if world > 1 else torch.enable_grad():
                loss_b = forward_loss(idx_b)
                opt.backward_biased(scaler.scale(loss_b))
            loss_lb = forward_loss(idx_lb)
            opt.backward_less_biased(scaler.scale(loss_lb))
        scaler.step(opt)
        scaler.update()
        sched.step()
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            line = (f"step {done}/{args.steps} loss_b {loss_b.item():.4f} "
                    f"loss_lb {loss_lb.item():.4f} lr {sched.get_last_lr()[0]:.3g} "
                    f"skipped {opt.skipped_steps}")
            if opt.statistics is not None:
                stats = opt.statistics.as_floats()
                line += (f" |g_b| {stats['norm_b']:.3g} |g_lb| {stats['norm_lb']:.3g} "
                         f"|g| {stats['norm']:.3g} cos {stats['cos']:.3f}")
            print(line, flush=True)
        if args.checkpoint and rank == 0 and (done % args.checkpoint_every == 0
                                              or done == args.steps):
            save_checkpoint(args.checkpoint, done, model, opt, scaler, sched, generator)

    if rank == 0:
        metrics = evaluate(model, x_test, y_test, a_test, device, amp_dtype)
        print(f"test GBA {metrics.gba:.4f} WGA {metrics.wga:.4f} accuracy {metrics.accuracy:.4f}",
              flush=True)
    if world > 1:
        dist.barrier()  # rank 0 evaluated alone: tear down together (gloo aborts otherwise)
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["synthetic", "colored-mnist"], default="synthetic")
    p.add_argument("--minority", type=float, default=0.05, help="share of bias-conflicting samples")
    p.add_argument("--n-per-class", type=int, default=400, help="synthetic training samples per class")
    p.add_argument("--c", type=float, default=0.5, help="B_lb's mixing factor (Eq. 4)")
    p.add_argument("--beta", type=float, default=1.0, help="extrapolation factor")
    p.add_argument("--batch-per-class", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--wrapper", action="store_true",
                   help="torch.optim's optimizer inside GERNEWrapper instead of the fused GERNE")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--mode", choices=["stash", "lean", "one-backward"], default="stash",
                   help="keep g_b apart (stash) or accumulate both backwards in .grad (lean)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last convolutions (the fast layout under AMP on GPUs)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the extrapolated gradient g to this 2-norm inside the step")
    p.add_argument("--statistics", action="store_true", help="log |g_b|, |g_lb|, |g|, cos")
    p.add_argument("--backend", default="auto")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world-size", type=int, default=1, help="DDP processes")
    p.add_argument("--checkpoint", default="", help="checkpoint file; resumes when it exists")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.mode == "lean" and args.statistics:
        p.error("--statistics needs --mode stash (the lean mode never has g_b and g_lb apart)")
    return args


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    if args.world_size == 1:
        train(0, args)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.multiprocessing.spawn(train, args=(args,), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
