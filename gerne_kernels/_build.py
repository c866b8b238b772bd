"""Compiles the C++/CUDA kernels on first use and caches them.

Each op file ``csrc/ops/<op>.h`` is compiled once per device library by a generated unit of two
includes, the device's harness (``csrc/cpu/harness.h``, ``csrc/cuda/harness.cuh``) and the op:
adding an op adds its file, and no source list changes. The build goes through
``torch.utils.cpp_extension.load`` with ninja into
``<cache>/<kind>-torch<version>-<key>``, where ``key`` hashes the torch and CUDA versions, the
Python version, the compiler flags, the CUDA architectures and the sources. ``<cache>`` is
``$GERNE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/gerne_kernels``, else ``~/.cache/gerne_kernels``,
else (not writable, e.g. a read-only home) ``<tmp>/gerne_kernels-<uid>``. A finished build leaves
an ``ok`` marker and later processes load the library directly, without running ninja.

A failed build never raises from here: it returns a ``BuildResult`` whose ``error`` says why and
whose ``log_path`` holds the compiler's output (in the temp folder when the cache is not
writable). A missing or broken compiler or ninja is found before any build starts. Builds are
serialised by an advisory ``flock`` that the kernel releases when a builder dies, so a killed
build cannot wedge later ones, and a waiter gives up after ``$GERNE_KERNELS_BUILD_TIMEOUT``
seconds naming the process that holds the lock. The lock file that cpp_extension itself leaves
behind is removed while we hold ours, and a cached library that no longer loads is rebuilt.
"""

import dataclasses
import fcntl
import glob
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
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


def cache_location():
    """(folder that holds the builds, why that folder); see the module docstring for the order.

    The temp fallback is ``<tmp>/gerne_kernels-<uid>`` when this user owns it (or can create it),
    else a fresh private folder: a folder planted there by another user is never built into."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit, f"from ${CACHE_ENV}"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    preferred = os.path.join(base, "gerne_kernels")
    if _writable_dir(preferred):
        return preferred, "from $XDG_CACHE_HOME" if xdg else "the default (~/.cache)"
    why = f"{preferred} is not writable: temp fallback (set ${CACHE_ENV} to choose)"
    global _private_fallback
    shared = os.path.join(tempfile.gettempdir(), f"gerne_kernels-{os.getuid()}")
    if _owned_private_dir(shared):
        return shared, why
    if _private_fallback is None:
        _private_fallback = tempfile.mkdtemp(prefix="gerne_kernels-")
    return _private_fallback, why


_private_fallback = None


def _owned_private_dir(path):
    """Creates ``path`` if needed; True if it is a real folder of ours that others cannot write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and _writable_dir(path))


def cache_root():
    """The folder that holds the builds; see the module docstring for the search order."""
    return cache_location()[0]


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


# The generated units (see the module docstring), written into the build folder.
_HARNESS = {"cpu": ("cpp", "cpu/harness.h", "CPU"), "cuda": ("cu", "cuda/harness.cuh", "CUDA")}
_UNIT = """// Generated by gerne_kernels/_build.py: csrc/ops/{op}.h compiled by the {device} harness.
#include "{harness}"
#include "ops/{op}.h"
"""


def _units(kind):
    """{file name: text} of the generated compilation units of one kind, one per op file."""
    extension, harness, device = _HARNESS[kind]
    ops = sorted(os.path.splitext(os.path.basename(path))[0]
                 for path in glob.glob(os.path.join(source_dir(), "ops", "*.h")))
    return {f"{op}.{extension}": _UNIT.format(op=op, device=device, harness=harness)
            for op in ops}


@dataclasses.dataclass
class _Spec:
    kind: str
    sources: list   # source files of the kind's own folder, compiled as they are
    units: dict     # generated units: {file name: text}
    cflags: list
    cuda_cflags: list
    ldflags: list
    include_paths: list
    arch_list: str


def _spec(kind):
    src = source_dir()
    if kind == "cpu":
        return _Spec("cpu", sorted(glob.glob(os.path.join(src, "cpu", "*.cpp"))), _units("cpu"),
                     _cpu_flags(), [], ["-fopenmp"], [src], "")
    if kind == "cuda":
        sources = sorted(glob.glob(os.path.join(src, "cuda", "*.cu")) +
                         glob.glob(os.path.join(src, "cuda", "*.cpp")))
        # No --use_fast_math: it flushes denormals and approximates division and sqrt, and the
        # kernels must round like torch.optim. The C++ standard: cpp_extension picks torch's.
        return _Spec("cuda", sources, _units("cuda"), ["-O3"], ["-O3", "-lineinfo"], [],
                     [src] + _cuda_include_paths(), cuda_arch_list())
    raise ValueError(f"unknown extension kind {kind!r}; expected 'cpu' or 'cuda'")


def _key(spec):
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, spec.kind,
                 " ".join(spec.cflags), " ".join(spec.cuda_cflags), " ".join(spec.ldflags),
                 spec.arch_list, os.environ.get("CXX", "")):
        h.update(part.encode())
    for name, text in sorted(spec.units.items()):
        h.update(name.encode())
        h.update(text.encode())
    src = source_dir()
    headers = sorted(glob.glob(os.path.join(src, "**", "*.h"), recursive=True) +
                     glob.glob(os.path.join(src, "**", "*.cuh"), recursive=True))
    for path in sorted(spec.sources) + headers:
        h.update(os.path.relpath(path, src).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _write_units(spec, build_dir):
    """The generated units in <build_dir>/units, as paths. A file is rewritten only when its text
    changed, so that ninja, which goes by modification times, does not recompile it."""
    folder = os.path.join(build_dir, "units")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, text in sorted(spec.units.items()):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                unchanged = f.read() == text
        except OSError:
            unchanged = False
        if not unchanged:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def build_dir_for(kind):
    spec = _spec(kind)
    version = torch.__version__.replace("+", "_")
    return os.path.join(cache_root(), f"{kind}-torch{version}-{_key(spec)}")


def _compiler_command():
    """$CXX split like a shell would (``ccache g++`` is two words), default ``c++``."""
    words = shlex.split(os.environ.get("CXX", "") or "c++")
    return words or ["c++"]


def _tail(text, lines=5):
    text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _preflight(spec):
    """A reason the build cannot start, or ''. Checked first so that a missing or broken tool
    costs milliseconds, not a failed (or hung) ninja run."""
    if not spec.sources and not spec.units:
        return f"no {spec.kind} sources (csrc/ops/*.h) found under {source_dir()}"
    cxx = _compiler_command()
    shown = os.environ.get("CXX", "c++")
    if shutil.which(cxx[0]) is None:
        return (f"C++ compiler {shown!r} not found (from $CXX, else 'c++' on $PATH); "
                "set CXX to a working compiler, e.g. CXX=g++")
    try:
        subprocess.run(cxx + ["--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       check=True, timeout=30)
    except subprocess.CalledProcessError as exc:
        return (f"C++ compiler {shown!r} does not run: `--version` exited with "
                f"{exc.returncode} ({_tail(exc.output)}); set CXX to a working compiler")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"C++ compiler {shown!r} does not run ({exc}); set CXX to a working compiler"
    if shutil.which("ninja") is None:
        return "ninja not found on $PATH (pip install ninja, or add its folder to PATH)"
    try:
        subprocess.run(["ninja", "--version"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ninja on $PATH ({shutil.which('ninja')}) does not run ({exc}); pip install ninja"
    if spec.kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return ("nvcc not found: set CUDA_HOME to the CUDA toolkit folder "
                    "(the one whose lib64 holds libcudart)")
        if not any(glob.glob(os.path.join(CUDA_HOME, lib, "libcudart.so*"))
                   for lib in ("lib64", "lib")):
            return (f"libcudart not found under CUDA_HOME={CUDA_HOME} (lib64 or lib): set "
                    "CUDA_HOME to the CUDA toolkit folder, e.g. /usr/local/cuda")
        if not spec.arch_list:
            return "no CUDA device visible and TORCH_CUDA_ARCH_LIST not set"
    return ""


class _FileLock:
    """flock with a deadline; the OS drops it when the holding process dies. The holder writes
    its pid into the file, so that a waiter that gives up can say who is building."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
                    os.close(self.fd)
                    who = f"process {holder}" if holder.isdigit() else "another process"
                    raise TimeoutError(
                        f"{who} has held the build lock {self.path} for over "
                        f"{self.timeout:.0f} s without finishing; wait for it, end it, or raise "
                        f"${BUILD_TIMEOUT_ENV} (seconds) to wait longer") from None
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
        return True
    except OSError:
        return False


def _fallback_log_path(kind):
    """Where the log goes when the build folder itself cannot be created."""
    return os.path.join(tempfile.gettempdir(), f"gerne_kernels-{os.getuid()}-{kind}-build.log")


def _failure_summary(exc):
    """One line for the user: the compiler's first error line if there is one."""
    text = str(exc)
    output = getattr(exc, "output", None)
    if output:
        text += "\n" + (output.decode(errors="replace") if isinstance(output, bytes) else output)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (re.compile(r"(^|\s|:)(fatal )?error:", re.I), re.compile(r"^FAILED:")):
        for line in lines:
            if pattern.search(line):
                return line[:400]
    return lines[0][:400] if lines else type(exc).__name__


def _forget_in_process_build(name):
    """cpp_extension remembers per process which sources it built under ``name`` and skips the
    build when asked again; a retry after a failed build must really rebuild."""
    from torch.utils import cpp_extension
    entries = getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", None)
    if isinstance(entries, dict):
        entries.pop(name, None)


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

    def fail(error, log_text):
        """Reports ``error``; the log goes to the build folder, else to the temp folder."""
        try:
            os.makedirs(build_dir, exist_ok=True)
        except OSError:
            pass
        if not _write_log(result.log_path, log_text):
            result.log_path = _fallback_log_path(kind)
            if not _write_log(result.log_path, log_text):
                result.log_path = ""
        return finish(False, error)

    def load_library():
        if load:
            torch.ops.load_library(library_path)

    def cached():
        return os.path.isfile(ok_marker) and os.path.isfile(library_path)

    corrupt = ""
    if cached():
        try:
            load_library()
            return finish(True, cached=True)
        except OSError as exc:  # dlopen refused the file (truncated, not ELF): rebuilt below
            corrupt = f"loading the cached library {library_path} failed, rebuilt it:\n{exc}\n"
        except Exception as exc:  # e.g. its ops are already registered from another library
            return fail(f"loading {library_path} failed: {_failure_summary(exc)}",
                        f"{exc}\n\n{traceback.format_exc()}")
    reason = _preflight(spec)
    if reason:
        return fail(reason, reason + "\n")
    try:
        os.makedirs(build_dir, exist_ok=True)
        if not _writable_dir(build_dir):
            raise PermissionError(f"cannot write into {build_dir}")
    except OSError as exc:
        root, why = cache_location()
        error = (f"the build cache {root} ({why}) is not writable ({exc}); set ${CACHE_ENV} "
                 "to a writable folder")
        return fail(error, error + "\n")
    try:
        timeout = float(os.environ.get(BUILD_TIMEOUT_ENV, "900"))
        with _FileLock(build_dir + ".lock", timeout):
            if cached() and not corrupt:
                load_library()  # another process finished it while we waited
                return finish(True, cached=True)
            # Whatever a killed or failed build left behind: cpp_extension's own lock file
            # (older torch waits forever while it exists) and a half-valid cache entry.
            for leftover in (os.path.join(build_dir, "lock"), ok_marker) + (
                    (library_path,) if corrupt else ()):
                if os.path.exists(leftover):
                    os.remove(leftover)
            from torch.utils import cpp_extension
            _forget_in_process_build(name)
            sources = spec.sources + _write_units(spec, build_dir)
            kwargs = dict(name=name, sources=sources, extra_cflags=spec.cflags,
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
            _write_log(log_path, f"{corrupt}built {library_path}\nflags: {spec.cflags} "
                                 f"{spec.cuda_cflags}\narch: {spec.arch_list}\n")
            with open(ok_marker, "w") as f:
                f.write(library_path + "\n")
            return finish(True)
    except Exception as exc:
        output = getattr(exc, "output", None)
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        log_text = f"{corrupt}{exc}\n\n{output or ''}\n{traceback.format_exc()}"
        return fail(f"build failed: {_failure_summary(exc)}", log_text)
