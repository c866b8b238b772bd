"""The tests in this folder run the Triton kernels in Triton's interpreter on the CPU. The
interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET=1 must be set before
triton is first imported: tests/test_triton_kernel.py runs this folder in a subprocess with it
set. In a session without it, these files are not collected (they would need a GPU)."""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)  # for triton_checks.py, shared with the GPU tests

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
