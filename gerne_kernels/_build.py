"""Compiles the C++/CUDA kernels on first use and caches them.

The build goes through ``torch.utils.cpp_extension.load`` with ninja into
``<cache>/<kind>-torch<version>-<key>``, where ``key`` hashes the torch and CUDA versions, the
Python version, the compiler flags, the CUDA architectures and the sources. ``<cache>`` is
``$GERNE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/gerne_kernels``, else ``~/.cache/gerne_kernels``,
else (not writable) a folder in the system temp dir. A finished build leaves an ``ok`` marker and
later processes load the library directly, without running ninja.

A failed build never raises from here: it returns a ``BuildResult`` whose ``error`` says why and
whose ``log_path`` holds the compiler's output. Builds are serialised by an advisory ``flock``
that the kernel releases when a builder dies, so a killed build cannot wedge later ones; the
lock file that cpp_extension itself leaves behind is removed while we hold ours.
"""

import dataclasses
import fcntl
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_TIMEOUT_ENV = "GERNE_KERNELS_BUILD_TIMEOUT"
CACHE_ENV = "GERNE_KERNELS_CACHE"


@dataclasses.dataclass
class BuildResult:
    kind: str
    ok: bool
    error: str = ""
    log_path: str = ""
    build_dir: str = ""
    library_path: str = ""
    seconds: float = 0.0
    cached: bool = False


def source_dir():
    """csrc/ shipped inside the installed package, else the repository's csrc/."""
    for candidate in (os.path.join(_PACKAGE_DIR, "csrc"),
                      os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(candidate, "gerne_math.h")):
            return candidate
    raise FileNotFoundError(
        "gerne_kernels: the C++ sources (csrc/gerne_math.h) are missing from the installation; "
        "reinstall with `pip install .` from the repository root")


def _writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def cache_root():
    """The folder that holds the builds; see the module docstring for the search order."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    preferred = os.path.join(xdg, "gerne_kernels")
    if _writable_dir(preferred):
        return preferred
    return os.path.join(tempfile.gettempdir(), f"gerne_kernels-{os.getuid()}")


def _cpu_flags():
    flags = ["-O3", "-fopenmp"]  # the C++ standard: cpp_extension picks the one torch needs
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512", "-mavx512f",
                  "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    elif capability == "AVX2":
        flags += ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma", "-mf16c"]
    return flags


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST if set, else the visible device's architecture with +PTX."""
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}+PTX"
    return ""


def _cuda_include_paths():
    # Wheels of torch+cu13 keep some CUDA headers (cusparse.h, needed by ATen/cuda/CUDAContext.h)
    # in site-packages/nvidia/cu13/include rather than in the toolkit.
    paths = []
    try:
        import nvidia
        for root in nvidia.__path__:
            paths += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    except ImportError:
        pass
    return paths


@dataclasses.dataclass
class _Spec:
    kind: str
    sources: list
    cflags: list
    cuda_cflags: list
    ldflags: list
    include_paths: list
    arch_list: str


def _spec(kind):
    src = source_dir()
    if kind == "cpu":
        return _Spec("cpu", sorted(glob.glob(os.path.join(src, "cpu", "*.cpp"))), _cpu_flags(),
                     [], ["-fopenmp"], [src], "")
    if kind == "cuda":
        sources = sorted(glob.glob(os.path.join(src, "cuda", "*.cu")) +
                         glob.glob(os.path.join(src, "cuda", "*.cpp")))
        return _Spec("cuda", sources, ["-O3", "-std=c++17"],
                     ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"], [],
                     [src] + _cuda_include_paths(), cuda_arch_list())
    raise ValueError(f"unknown extension kind {kind!r}; expected 'cpu' or 'cuda'")


def _key(spec):
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, spec.kind,
                 " ".join(spec.cflags), " ".join(spec.cuda_cflags), " ".join(spec.ldflags),
                 spec.arch_list, os.environ.get("CXX", "")):
        h.update(part.encode())
    src = source_dir()
    headers = sorted(glob.glob(os.path.join(src, "**", "*.h"), recursive=True) +
                     glob.glob(os.path.join(src, "**", "*.cuh"), recursive=True))
    for path in sorted(spec.sources) + headers:
        h.update(os.path.relpath(path, src).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build_dir_for(kind):
    spec = _spec(kind)
    version = torch.__version__.replace("+", "_")
    return os.path.join(cache_root(), f"{kind}-torch{version}-{_key(spec)}")


def _preflight(spec):
    """A reason the build cannot start, or ''. Checked first so that a missing tool costs
    milliseconds, not a failed ninja run."""
    if not spec.sources:
        return f"no {spec.kind} sources found under {source_dir()}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"C++ compiler {cxx!r} not found (set CXX to a working compiler, e.g. g++)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except RuntimeError:
        return "ninja not found (pip install ninja)"
    if spec.kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return ("nvcc not found: set CUDA_HOME to the CUDA toolkit folder "
                    "(the one whose lib64 holds libcudart)")
        if not spec.arch_list:
            return "no CUDA device visible and TORCH_CUDA_ARCH_LIST not set"
    return ""


class _FileLock:
    """flock with a deadline; the OS drops it when the holding process dies."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(
                        f"another process has held the build lock {self.path} for over "
                        f"{self.timeout:.0f} s (raise {BUILD_TIMEOUT_ENV} to wait longer)")
                time.sleep(0.1)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _library_name(kind, build_dir):
    return f"gerne_kernels_{kind}_{os.path.basename(build_dir).rsplit('-', 1)[-1]}"


def _write_log(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


def build(kind, *, load=True):
    """Builds (or finds in the cache) and loads the ``kind`` extension; never raises.

    ``load=False`` only proves that the sources compile and link (used for CUDA on machines
    without a GPU)."""
    start = time.perf_counter()
    try:
        spec = _spec(kind)
        build_dir = build_dir_for(kind)
    except Exception as exc:  # sources missing, unreadable cache: report, don't crash
        return BuildResult(kind, False, error=f"{type(exc).__name__}: {exc}")
    log_path = os.path.join(build_dir, "build.log")
    name = _library_name(kind, build_dir)
    library_path = os.path.join(build_dir, name + ".so")
    ok_marker = os.path.join(build_dir, "ok")
    result = BuildResult(kind, False, log_path=log_path, build_dir=build_dir,
                         library_path=library_path)

    def finish(ok, error="", cached=False):
        result.ok, result.error, result.cached = ok, error, cached
        result.seconds = time.perf_counter() - start
        return result

    def load_library():
        if load:
            torch.ops.load_library(library_path)

    if os.path.isfile(ok_marker) and os.path.isfile(library_path):
        try:
            load_library()
            return finish(True, cached=True)
        except Exception as exc:  # a corrupt cache entry: rebuild below
            _write_log(log_path, f"loading the cached library failed, rebuilding:\n{exc}\n")
    reason = _preflight(spec)
    if reason:
        try:
            os.makedirs(build_dir, exist_ok=True)
            _write_log(log_path, reason + "\n")
        except OSError:
            result.log_path = ""
        return finish(False, reason)
    try:
        os.makedirs(build_dir, exist_ok=True)
        timeout = float(os.environ.get(BUILD_TIMEOUT_ENV, "900"))
        with _FileLock(build_dir + ".lock", timeout):
            if os.path.isfile(ok_marker) and os.path.isfile(library_path):
                load_library()  # another process finished it while we waited
                return finish(True, cached=True)
            stale = os.path.join(build_dir, "lock")  # cpp_extension's own baton
            if os.path.exists(stale):
                os.remove(stale)
            from torch.utils import cpp_extension
            kwargs = dict(name=name, sources=spec.sources, extra_cflags=spec.cflags,
                          extra_ldflags=spec.ldflags, extra_include_paths=spec.include_paths,
                          build_directory=build_dir, is_python_module=False, verbose=False)
            if kind == "cuda":
                kwargs["extra_cuda_cflags"] = spec.cuda_cflags
            saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
            if spec.arch_list:
                os.environ["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
            try:
                try:
                    cpp_extension.load(**kwargs)
                except Exception:
                    # Without a GPU a CUDA library may build yet fail to load; a compile-only
                    # check (load=False) asks only that the library was produced.
                    if load or not os.path.isfile(library_path):
                        raise
            finally:
                if spec.arch_list:
                    if saved_arch is None:
                        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                    else:
                        os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
            _write_log(log_path, f"built {library_path}\nflags: {spec.cflags} "
                                 f"{spec.cuda_cflags}\narch: {spec.arch_list}\n")
            with open(ok_marker, "w") as f:
                f.write(library_path + "\n")
            return finish(True)
    except Exception as exc:
        _write_log(log_path, f"{exc}\n\n{traceback.format_exc()}")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return finish(False, f"build failed: {first_line}")
