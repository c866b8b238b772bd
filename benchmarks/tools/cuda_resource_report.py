"""Registers, spills and double-precision FMAs of every CUDA kernel, per architecture.

    export CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
    python3 benchmarks/tools/cuda_resource_report.py [--arch 90] [--arch 80] [--sass-dir DIR]

Builds nothing through torch: it takes the flags of this tree's CUDA build (its build.ninja,
written by gerne_kernels._build.build("cuda", load=False), which it runs first if needed),
compiles each generated unit to a cubin per architecture with `-Xptxas -v`, and prints per
kernel (op, storage type): registers, stack frame, spill stores/loads, and the number of DFMA
instructions in its SASS (cuobjdump -sass; $CUOBJDUMP, else the toolkit's, else Triton's). The
update kernels must have none: the double expressions they compute (1 - lr * wd) use explicitly
rounded operations, so the .default and .tensor overloads round alike. The prologue's DFMAs come
from the IEEE-exact __ddiv_rn and __dsqrt_rn sequences and from pow (a separate function); each
function is listed apart.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from gerne_kernels import _build  # noqa: E402

KERNEL_NAME = re.compile(r"(multi_tensor_kernel|tensor_prologue_kernel|finish_reduction_kernel)")
OP_NAME = re.compile(r"_(\w+?)_cu_\w+?_\d+(\w+?)E")


def cuobjdump():
    candidates = [os.environ.get("CUOBJDUMP"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    sys.exit("cuobjdump not found: set CUOBJDUMP")


def build_flags(build_dir=None):
    """nvcc, its flags but the architectures, and the units: of build_dir (an earlier build of
    the same sources' layout), else of this tree's build (built first if needed)."""
    if build_dir is None:
        built = _build.build("cuda", load=False)
        if not built.ok:
            sys.exit(f"the CUDA build failed: {built.error} (log: {built.log_path})")
        build_dir = built.build_dir
    with open(os.path.join(build_dir, "build.ninja")) as f:
        text = f.read()
    flags = shlex.split(re.search(r"^cuda_cflags = (.*)$", text, re.M).group(1))
    flags = [f for f in flags if not f.startswith("-gencode")]
    units = sorted(glob.glob(os.path.join(build_dir, "units", "*.cu")))
    return re.search(r"^nvcc = (.*)$", text, re.M).group(1), flags, units


def short_name(mangled):
    """'multi_tensor_kernel<BFloat16, AdamStep>' from a mangled kernel name."""
    kernel = KERNEL_NAME.search(mangled).group(1)
    op = re.search(r"(\d+)([A-Z]\w*?)(EE|E)", mangled.split("GLOBAL__N__")[1]).group(2) \
        if "GLOBAL__N__" in mangled else "?"
    dtype = ""
    if kernel == "multi_tensor_kernel":
        dtype = {"IN3c104HalfE": "float16", "IN3c108BFloat16E": "bfloat16",
                 "If": "float32"}.get(re.search(r"multi_tensor_kernel(IN3c104HalfE|IN3c108BFloat16E|If)",
                                                mangled).group(1), "?")
    return kernel, op, dtype


def compile_unit(arch, nvcc, flags, unit, extra_flags):
    """(ptxas's report, the SASS, the PTX) of one unit for one architecture."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "unit.cubin"), os.path.join(tmp, "unit.ptx")
        common = [nvcc, *flags, *extra_flags, f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        out = subprocess.run(common + ["-cubin", "-Xptxas", "-v", "-o", cubin, unit],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-4000:])
        subprocess.run(common + ["-ptx", "-o", ptx, unit], check=True, capture_output=True)
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        with open(ptx) as f:
            ptx_text = f.read()
    return out.stderr, sass, ptx_text


def ptx_fma_by_entry(ptx):
    """{kernel: fma.rn.f64 in its own PTX body}: the double fused multiply-adds the compiler made
    of the kernel's expressions (a called function's, such as pow's, are in its .func)."""
    counts = {}
    for part in re.split(r"(?=^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s|^\s*\.func\s)", ptx,
                         flags=re.M):
        m = re.match(r"\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)", part)
        if m:
            counts[m.group(1)] = len(re.findall(r"\bfma\.rn\.f64\b", part))
    return counts


def parse_ptxas(text):
    """[{name, regs, stack, spill_st, spill_ld}] of every function in a ptxas -v report."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = {"name": m.group(1), "regs": "-", "stack": 0, "spill_st": 0, "spill_ld": 0}
            rows.append(current)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                           spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["regs"] = int(m.group(1))
    return rows


def blocks_per_sm(registers, label, threads=256):
    """Resident blocks of `threads` per SM (65536 registers, allocated 8 a thread at a time; at
    most 2048 threads), for the multi-tensor kernels."""
    if not isinstance(registers, int) or not label.startswith("multi_tensor_kernel"):
        return ""
    allocated = -(-registers // 8) * 8
    return min(2048 // threads, 65536 // (allocated * threads))


def report(arch, nvcc, flags, units, sass_dir, extra_flags=()):
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        outputs = list(pool.map(lambda u: compile_unit(arch, nvcc, flags, u, extra_flags), units))
    print(f"\nsm_{arch}: kernel<op, storage>  registers  blocks/SM  stack  spill-stores  "
          "spill-loads  DFMA-in-SASS  fma.rn.f64-in-PTX")
    for unit, (ptxas, sass, ptx) in zip(units, outputs):
        ptx_fma = ptx_fma_by_entry(ptx)
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            with open(os.path.join(sass_dir, f"{os.path.basename(unit)}.sm_{arch}.sass"), "w") as f:
                f.write(sass)
        dfma = {}
        for block in re.split(r"\n\s*Function : ", sass)[1:]:
            dfma[block.split("\n", 1)[0].strip()] = len(re.findall(r"\bDFMA\b", block))
        for row in parse_ptxas(ptxas):
            if not KERNEL_NAME.search(row["name"]):
                continue  # device functions are part of their kernel's SASS
            kernel, op, dtype = short_name(row["name"])
            label = f"{kernel}<{op}{', ' + dtype if dtype else ''}>"
            print(f"  {label:50s} {row['regs']:>4} {blocks_per_sm(row['regs'], label):>5} "
                  f"{row['stack']:>6} {row['spill_st']:>6} {row['spill_ld']:>6} "
                  f"{dfma.get(row['name'], 0):>6} {ptx_fma.get(row['name'], 0):>6}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", action="append", type=int)
    parser.add_argument("--sass-dir")
    parser.add_argument("--nvcc-flag", action="append", default=[],
                        help="an extra nvcc flag, e.g. -DNAME=VALUE (to try variants)")
    parser.add_argument("--build-dir", help="take the flags of this CUDA build folder instead of "
                                            "building this tree first")
    args = parser.parse_args()
    nvcc, flags, units = build_flags(args.build_dir)
    for arch in args.arch or [90, 80]:
        report(arch, nvcc, flags, units, args.sass_dir, args.nvcc_flag)


if __name__ == "__main__":
    main()
