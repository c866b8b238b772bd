"""The CUDA sources compile and link for sm_80 and sm_90, on a machine without a GPU.

torch with CUDA support and nvcc (under CUDA_HOME) are all it takes: the build runs in a
throwaway cache with TORCH_CUDA_ARCH_LIST="8.0;9.0" and load=False, then the library's fat
binary must hold machine code for both architectures. The tests skip where torch has no CUDA
or the toolkit is missing (nvcc, libcudart under CUDA_HOME), unless
GERNE_KERNELS_REQUIRE_CUDA_BUILD=1 (CI sets it), where they fail; with the tools present a
failed build always fails.
"""

import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from gerne_kernels import _backends, _build

REQUIRE_ENV = "GERNE_KERNELS_REQUIRE_CUDA_BUILD"
ARCHS = (80, 90)
FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF = 2


def _environment_lacks_cuda():
    """Why this machine cannot build CUDA code at all (no CUDA torch, no nvcc or libcudart under
    CUDA_HOME), or ''. _build's own pre-flight check, run before any compiler."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    return _build._preflight(_build._spec("cuda"))


def fatbin_elf_archs(library_path):
    """The SM architectures of the machine code (cubins) embedded in a library's fat binaries.

    A fat binary is a header (magic, version, header size, payload size) followed by entries,
    each a header (kind, ..., header size, payload size, ..., arch at byte 28) and its payload."""
    with open(library_path, "rb") as f:
        data = f.read()
    archs = set()
    pos = data.find(struct.pack("<I", FATBIN_MAGIC))
    while pos >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            if kind == FATBIN_ELF:
                archs.add(arch)
            entry += entry_header_size + payload_size
        pos = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    return archs


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cuda-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_build.CACHE_ENV, str(cache))
        mp.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        reason = _environment_lacks_cuda()
        if reason:
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"{REQUIRE_ENV}=1 but this machine cannot build CUDA code: {reason}")
            pytest.skip(f"{reason} (export CUDA_HOME=/path/to/cuda before running pytest)")
        _backends.reset()
        built = _build.build("cuda", load=False)
    _backends.reset()
    if not built.ok:  # the tools are there: a failed build is a bug in the sources or flags
        log = open(built.log_path).read()[-4000:] if os.path.isfile(built.log_path) else ""
        pytest.fail(f"the CUDA build failed: {built.error}\n{log}")
    return built


def test_cuda_sources_compile_and_link_for_sm80_and_sm90(cuda_build):
    assert os.path.isfile(cuda_build.library_path), cuda_build
    assert not cuda_build.cached  # a fresh cache: this run really compiled
    print(f"CUDA build: {cuda_build.seconds:.0f} s")
    archs = fatbin_elf_archs(cuda_build.library_path)
    assert set(ARCHS) <= archs, f"machine code for sm_{archs}, expected sm_80 and sm_90"


def test_cuda_ops_register_and_check_their_arguments(cuda_build):
    """Loaded in a fresh process (no GPU needed), the library registers every op of the registry
    (both overloads, one unit per op file) for the CUDA dispatch key; reached through that key
    with CPU tensors, the CUDA kernel's own argument check answers (the kernels themselves need a
    device)."""
    code = textwrap.dedent(f"""
        import torch
        from gerne_kernels import _ops
        torch.ops.load_library({cuda_build.library_path!r})
        for spec in _ops.OPS:
            for overload in ("", ".tensor"):
                name = "gerne_kernels::" + spec.name + overload
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        try:
            _ops.op("extrapolate_").redispatch(keys, [torch.ones(3)], [torch.ones(3)],
                                               [torch.ones(3)], torch.zeros(()), scale_b=-1.0,
                                               scale_lb=2.0)
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extrapolate_ (cuda): neither found_inf nor out is on a CUDA device" in out.stdout, \
        out.stdout
