"""Command line: ``python -m gerne_kernels info | demo ...``."""

import argparse
import os
import platform
import sys

import torch


def info(_args=None):
    """Prints the versions, the build cache and, per backend, whether it runs here and why not.
    Nothing is compiled: a C++ backend that is not in the cache is reported as not built."""
    from . import _backends, _build

    print(f"gerne_kernels {__import__('gerne_kernels').__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'}), "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
          f"threads: {torch.get_num_threads()}")
    try:
        print(f"sources: {_build.source_dir()}")
    except FileNotFoundError as exc:
        print(f"sources: MISSING ({exc})")
    root, why = _build.cache_location()
    print(f"build cache: {root}  ({why}; set ${_build.CACHE_ENV} to move it)")
    print()
    print(f"{'backend':<10} {'status':<12} detail")
    for name in _backends.BACKENDS[1:]:
        ok, reason, built = _backends.status(name, build=False)
        detail = reason
        if built is not None:
            where = built.build_dir if built.ok else built.log_path
            how = "cached" if built.cached else f"built in {built.seconds:.1f} s"
            detail = (f"{how}: {where}" if built.ok else f"{reason}; log: {where}")
        print(f"{name:<10} {'available' if ok else 'unavailable':<12} {detail}")
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    print()
    print("backend='auto' uses: " + ", ".join(
        f"{d} -> {_backends.auto_choice(d, build=False)}" for d in devices)
        + "  (with the backends available now)")
    return 0


def build(args):
    """Compiles the C++ backends into the cache, each in a child process bounded by
    --timeout seconds, and prints how long each took and where its log is."""
    import subprocess
    import time

    kinds = args.kinds or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    failed = 0
    for kind in kinds:
        start = time.perf_counter()
        code = ("import sys; from gerne_kernels import _build; r = _build.build(%r); "
                "print(r.build_dir if r.ok else f'{r.error} (log: {r.log_path})'); "
                "sys.exit(0 if r.ok else 1)" % kind)
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=args.timeout)
            ok, detail = done.returncode == 0, (done.stdout.strip().splitlines() or
                                                [done.stderr.strip()[-500:]])[-1]
        except subprocess.TimeoutExpired:
            ok, detail = False, f"gave up after {args.timeout:.0f} s (--timeout)"
        failed += not ok
        print(f"{kind}: {'built' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s: "
              f"{detail}")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gerne_kernels",
                                     description="GERNE optimizer kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, build cache, why a backend is unavailable "
                   "(compiles nothing)")
    build_parser = sub.add_parser("build", help="compile the C++ backends into the cache now")
    build_parser.add_argument("kinds", nargs="*", choices=["cpu", "cuda"],
                              help="what to build (default: cpu, and cuda with a GPU)")
    build_parser.add_argument("--timeout", type=float, default=900,
                              help="seconds each build may take (default 900)")
    sub.add_parser("demo", help="train ERM, resampling and GERNE on offline Colored MNIST",
                   add_help=False)
    sub.add_parser("reproduce", help="the paper's Table 1 protocol on offline Colored MNIST, "
                   "GERNE against five baselines", add_help=False)
    sub.add_parser("train", help="train GERNE on a local copy of Waterbirds, CelebA, "
                   "CivilComments, Colored MNIST or Corrupted CIFAR-10", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info(args)
    if args.command == "build":
        return build(args)
    if args.command == "demo":
        from . import demo
        return demo.main(rest)
    if args.command == "reproduce":
        from . import reproduce
        return reproduce.main(rest)
    if args.command == "train":
        from . import train_cli
        return train_cli.main(rest)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "default")
    sys.exit(main())
