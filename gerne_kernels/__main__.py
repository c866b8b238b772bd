"""Command line: ``python -m gerne_kernels info | demo ...``."""

import argparse
import os
import platform
import sys

import torch


def info(_args=None):
    """Prints the versions, the build cache and, per backend, whether it runs here and why not."""
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
        ok, reason, built = _backends.status(name)
        detail = reason
        if built is not None:
            where = built.build_dir if built.ok else built.log_path
            how = "cached" if built.cached else f"built in {built.seconds:.1f} s"
            detail = (f"{how}: {where}" if built.ok else f"{reason}; log: {where}")
        print(f"{name:<10} {'available' if ok else 'unavailable':<12} {detail}")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons are in the table above
        auto = {dev: _backends.implementation("auto", dev, torch.float32).name
                for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])}
    print()
    print("backend='auto' uses: " + ", ".join(f"{d} -> {n}" for d, n in auto.items()))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gerne_kernels",
                                     description="GERNE optimizer kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, build cache, why a backend is unavailable")
    sub.add_parser("demo", help="train ERM, resampling and GERNE on offline Colored MNIST",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info(args)
    if args.command == "demo":
        from . import demo
        return demo.main(rest)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "default")
    sys.exit(main())
