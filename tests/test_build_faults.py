"""Build faults never hang and never leave the user stuck.

Each fault runs against a throwaway cache. It must end within seconds in a working fallback with
one warning (backend="auto"), or in a clear error when backend="cpu" is asked for by name, and
``python -m gerne_kernels build`` must show the cause and the build log's path (``info``, which
compiles nothing, shows the cache folder and that ``auto`` falls back).

Faults that stop a build before it starts (missing or broken compiler, missing ninja, a lock held
by a live process, an unwritable cache) run in this process. Faults that need a real compile (two
builders at once, a builder killed midway, a stale lock file, a corrupt cached library) run in
subprocesses against ONE real build, made once per session by two processes racing each other
with a read-only home, so that the cache lands in the temp fallback.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import pytest
import torch

import gerne_kernels as gk
from gerne_kernels import _backends, _build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = 15.0  # seconds a fault that stops the build before it starts may take, generously
BUILD_TIMEOUT = 900  # seconds a subprocess that really compiles may take before the test fails


# ------------------------------------------------------------------------------------------------
# Faults

def _missing_compiler(tmp_path):
    return {"CXX": str(tmp_path / "no-such-dir" / "g++")}, ["not found", "CXX"]


def _broken_compiler(tmp_path):
    script = tmp_path / "broken-g++"
    script.write_text("#!/bin/sh\necho 'broken-g++: cannot execute cc1plus' >&2\nexit 1\n")
    script.chmod(0o755)
    return {"CXX": str(script)}, ["does not run", "cannot execute cc1plus"]


def _missing_ninja(tmp_path):
    """PATH holds a working c++ and nothing else (python itself is started by absolute path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("c++"), bin_dir / "c++")
    return {"PATH": str(bin_dir), "CXX": "c++"}, ["ninja not found", "pip install ninja"]


def _unwritable_cache(tmp_path):
    """GERNE_KERNELS_CACHE below a regular file: no one, root included, can create it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {_build.CACHE_ENV: str(blocker / "cache")}, ["not writable", _build.CACHE_ENV]


FAULTS = {"missing compiler": _missing_compiler, "broken compiler": _broken_compiler,
          "missing ninja": _missing_ninja, "unwritable cache": _unwritable_cache}


@pytest.fixture
def fresh_backends(monkeypatch, tmp_path):
    """A throwaway cache and no remembered build results; forgotten again afterwards, so that
    later tests see the normal cache."""
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "cache"))
    _backends.reset()
    yield
    _backends.reset()


@pytest.fixture(params=sorted(FAULTS))
def fault(request, monkeypatch, tmp_path, fresh_backends):
    """(environment of the fault, words the cause must contain); the fault is applied here."""
    env, words = FAULTS[request.param](tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env, words


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def train(model, opt, steps=3):
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x_b, x_lb = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
        opt.zero_grad()
        model(x_b).square().mean().backward()
        opt.stash_biased()
        model(x_lb).square().mean().backward()
        opt.step()


def gerne_warnings(records):
    return [str(w.message) for w in records
            if issubclass(w.category, RuntimeWarning) and "gerne_kernels" in str(w.message)]


def assert_names_cause_and_log(text, words):
    for word in words:
        assert word in text, f"{word!r} missing from: {text}"
    log = _backends.status("cpu")[2].log_path
    assert log and log in text, f"log path {log!r} missing from: {text}"
    with open(log) as f:
        assert words[0] in f.read()


# ------------------------------------------------------------------------------------------------
# Faults that stop the build before it starts: in this process

def test_auto_falls_back_with_one_warning(fault):
    _, words = fault
    model, ref = make_model(), make_model()
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = gk.GERNE(model.parameters(), optimizer="adam", lr=1e-2, beta=1.0, backend="auto")
        train(model, opt)
        train(model, gk.GERNE(model.parameters(), lr=0.1, backend="auto"))  # warned already
    assert time.monotonic() - started < FAST
    messages = gerne_warnings(records)
    assert len(messages) == 1, messages
    assert_names_cause_and_log(messages[0], words)
    assert "python -m gerne_kernels info" in messages[0]
    # The fallback is the reference path, and it trains.
    train(ref, gk.GERNE(ref.parameters(), optimizer="adam", lr=1e-2, beta=1.0,
                        backend="reference"))
    train(ref, gk.GERNE(ref.parameters(), lr=0.1, backend="reference"))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_cpu_by_name_raises_a_clear_error_and_changes_nothing(fault):
    _, words = fault
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0, backend="cpu")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        train(model, opt, steps=1)
    assert time.monotonic() - started < FAST
    assert_names_cause_and_log(str(info.value), words)
    assert "'cpu' backend is unavailable" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def run_cli(command, env_changes, drop=(), timeout=120):
    """``python -m gerne_kernels <command>`` with os.environ plus env_changes, less drop:
    (exit status, stdout, seconds)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.update(env_changes)
    for key in drop:
        env.pop(key, None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gerne_kernels", *command], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, time.monotonic() - started


def run_info(env_changes, drop=(), timeout=120):
    code, stdout, seconds = run_cli(["info"], env_changes, drop, timeout)
    assert code == 0, stdout
    return stdout, seconds


def info_row(stdout, backend):
    rows = [line for line in stdout.splitlines() if line.split()[:1] == [backend]]
    assert len(rows) == 1, stdout
    return rows[0]


def failed_build_line(env_changes, drop=()):
    """`build cpu`'s line for a build that fails: (the line, its log path, seconds)."""
    code, stdout, seconds = run_cli(["build", "cpu"], env_changes, drop)
    lines = [line for line in stdout.splitlines() if line.startswith("cpu: ")]
    assert code == 1 and len(lines) == 1 and "FAILED" in lines[0], stdout
    return lines[0], lines[0].rsplit("(log: ", 1)[1].rstrip(")").strip(), seconds


def test_build_command_shows_cause_and_log_path(fault, tmp_path):
    _, words = fault  # applied to os.environ, which the subprocesses inherit
    line, log, seconds = failed_build_line({})
    assert seconds < 60  # the interpreter and torch start within it; the fault costs nothing
    for word in words:
        assert word in line
    with open(log) as f:
        assert words[0] in f.read()
    stdout, _ = run_info({})
    assert "unavailable" in info_row(stdout, "cpu")
    assert "backend='auto' uses: cpu -> reference" in stdout


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def hold_build_lock(lock_path, seconds):
    """A live process that holds the build lock, as a builder that hangs would."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock_path, str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_live_lock_holder_gives_up_after_the_timeout_naming_it(monkeypatch, fresh_backends):
    monkeypatch.setenv(_build.BUILD_TIMEOUT_ENV, "1.5")
    build_dir = _build.build_dir_for("cpu")
    os.makedirs(build_dir)
    holder = hold_build_lock(build_dir + ".lock", 120)
    try:
        model = make_model()
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            train(model, gk.GERNE(model.parameters(), lr=0.1, backend="auto"))
        assert 1.5 <= time.monotonic() - started < FAST
        messages = gerne_warnings(records)
        assert len(messages) == 1, messages
        assert_names_cause_and_log(
            messages[0], [f"process {holder.pid}", "build lock", _build.BUILD_TIMEOUT_ENV])
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------
# Where the cache goes

@pytest.fixture
def read_only_home(tmp_path):
    """A home folder in which ~/.cache cannot be created. Root ignores permission bits, so for
    root the home is a regular file instead (creating ~/.cache then fails with ENOTDIR)."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    probe = home / ".probe"
    try:
        probe.mkdir()
    except OSError:
        yield str(home)
    else:  # running as root
        probe.rmdir()
        home.chmod(0o755)
        home.rmdir()
        home.write_text("")
        yield str(home)
    if home.is_dir():
        home.chmod(0o755)


@pytest.fixture
def temp_folder(monkeypatch, tmp_path):
    """TMPDIR for this process (tempfile caches it) and for subprocesses."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(_build, "_private_fallback", None)
    return folder


def test_read_only_home_puts_the_cache_in_the_temp_fallback(monkeypatch, read_only_home,
                                                            temp_folder):
    monkeypatch.setenv("HOME", read_only_home)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(_build.CACHE_ENV, raising=False)
    root, why = _build.cache_location()
    assert root == str(temp_folder / f"gerne_kernels-{os.getuid()}")
    assert "not writable" in why and _build.CACHE_ENV in why
    assert _build._writable_dir(root)


def test_the_environment_variable_wins_over_a_read_only_home(monkeypatch, read_only_home,
                                                             tmp_path):
    monkeypatch.setenv("HOME", read_only_home)
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "chosen"))
    assert _build.cache_location() == (str(tmp_path / "chosen"), f"from ${_build.CACHE_ENV}")


def test_temp_fallback_planted_by_someone_else_is_not_used(monkeypatch, read_only_home,
                                                          temp_folder):
    """A world-writable <tmp>/gerne_kernels-<uid> may hold a library planted by another user:
    the build goes to a fresh private folder instead."""
    monkeypatch.setenv("HOME", read_only_home)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(_build.CACHE_ENV, raising=False)
    planted = temp_folder / f"gerne_kernels-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    root, _ = _build.cache_location()
    assert root != str(planted) and root.startswith(str(temp_folder))
    mode = os.stat(root).st_mode
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert _build.cache_location()[0] == root  # one fallback per process


def test_info_with_a_read_only_home_shows_the_fallback_and_the_log(read_only_home, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"HOME": read_only_home, "TMPDIR": str(temp), "CXX": str(tmp_path / "missing-g++")}
    drop = (_build.CACHE_ENV, "XDG_CACHE_HOME")
    stdout, _ = run_info(env, drop=drop)
    fallback = str(temp / f"gerne_kernels-{os.getuid()}")
    assert f"build cache: {fallback}" in stdout and "not writable" in stdout
    _, log, _ = failed_build_line(env, drop=drop)
    assert log.startswith(fallback) and os.path.isfile(log)


# ------------------------------------------------------------------------------------------------
# Faults that need a real build: subprocesses sharing one build

BUILDER = textwrap.dedent("""
    import dataclasses, json, torch
    from gerne_kernels import _build, _ops, _reference
    result = _build.build("cpu")
    out = dataclasses.asdict(result)
    if result.ok:  # the library works: one fused SGD step equals the reference
        torch.manual_seed(0)
        p, g_b, g_lb, buf = (torch.randn(1000) for _ in range(4))
        q, buf_q = p.clone(), buf.clone()
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01,
                  maximize=False, is_first_step=False, scale_b=-1.0, scale_lb=2.0)
        _ops.op("sgd_step_")([p], [g_b], [g_lb], [buf], torch.zeros(()), **kw)
        _reference.sgd_step_([q], [g_b], [g_lb], [buf_q], torch.zeros(()), **kw)
        out["op_matches"] = bool(torch.allclose(p, q, rtol=1e-6, atol=1e-7))
    print("RESULT " + json.dumps(out), flush=True)
""")


@dataclasses.dataclass
class SharedBuild:
    env: dict            # HOME read-only, TMPDIR the session folder, no GERNE_KERNELS_CACHE
    results: list        # the two racing builders' outputs
    build_dir: str
    library_path: str


def start_builder(env):
    """A builder in its own process group, so that it can be killed with its ninja and c++."""
    return subprocess.Popen([sys.executable, "-c", BUILDER], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def builder_result(proc, timeout=BUILD_TIMEOUT):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"a build did not finish within {timeout} s")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1][len("RESULT "):])


def run_builder(env):
    return builder_result(start_builder(env))


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory):
    """One real build for the session, made by two processes started together with a read-only
    home and no GERNE_KERNELS_CACHE: the cache goes to the temp fallback, one builds, the other
    waits for the lock and loads the result."""
    base = tmp_path_factory.mktemp("shared-build")
    home = base / "home"
    home.write_text("")  # a regular file: ~/.cache cannot be created, even by root
    temp = base / "tmp"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, HOME=str(home), TMPDIR=str(temp))
    for key in (_build.CACHE_ENV, "XDG_CACHE_HOME"):
        env.pop(key, None)
    builders = [start_builder(env) for _ in range(2)]
    results = [builder_result(proc) for proc in builders]
    for result in results:
        assert result["ok"], open(result["log_path"]).read() if result["log_path"] else result
    return SharedBuild(env, results, results[0]["build_dir"], results[0]["library_path"])


def test_two_processes_building_at_once_both_end_with_a_working_library(shared_build):
    results = shared_build.results
    assert all(r["ok"] and r["op_matches"] for r in results)
    assert sorted(r["cached"] for r in results) == [False, True]  # one built, one waited
    builder = next(r for r in results if not r["cached"])
    waiter = next(r for r in results if r["cached"])
    assert waiter["seconds"] > 0.5 * builder["seconds"]  # it waited for the lock, then loaded


def test_real_build_with_a_read_only_home_lands_in_the_temp_fallback(shared_build):
    fallback = os.path.join(shared_build.env["TMPDIR"], f"gerne_kernels-{os.getuid()}")
    assert os.path.dirname(shared_build.build_dir) == fallback
    stdout, _ = run_info(shared_build.env, drop=(_build.CACHE_ENV, "XDG_CACHE_HOME"))
    assert f"build cache: {fallback}" in stdout
    row = info_row(stdout, "cpu")
    assert "available" in row and "unavailable" not in row and shared_build.build_dir in row
    assert "backend='auto' uses: cpu -> cpu" in stdout


def wait_until_locked(lock_path, proc, timeout=60):
    """Waits until another process holds the flock on lock_path (probing, never holding it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the builder ended before it took the lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644) if os.path.exists(
            os.path.dirname(lock_path)) else None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return
            finally:
                os.close(fd)
        time.sleep(0.05)
    pytest.fail("the builder never took the build lock")


def object_files(build_dir):
    return sorted((os.path.getsize(os.path.join(build_dir, f)), f)
                  for f in os.listdir(build_dir) if f.endswith(".o"))


def test_builder_killed_midway_does_not_block_the_next(shared_build):
    """SIGKILL a builder (and its ninja and compiler) while it recompiles: its flock dies with it,
    cpp_extension's lock file and a half-written object stay behind. The next build finishes."""
    build_dir = shared_build.build_dir
    os.remove(os.path.join(build_dir, "ok"))
    smallest_object = object_files(build_dir)[0][1]
    os.remove(os.path.join(build_dir, smallest_object))  # forces one real compile and a link
    victim = start_builder(shared_build.env)
    wait_until_locked(build_dir + ".lock", victim)
    time.sleep(1.0)  # well inside the compile of one file (over 5 s here)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert not os.path.exists(os.path.join(build_dir, "ok"))
    started = time.monotonic()
    result = run_builder(shared_build.env)
    assert result["ok"] and result["op_matches"] and not result["cached"]
    assert time.monotonic() - started < BUILD_TIMEOUT


def test_stale_lock_file_and_dead_lock_holder_do_not_block(shared_build):
    """A lock file of cpp_extension's (older torch waits for as long as it exists) and our flock
    held by a process that was then killed: the next build runs at once."""
    build_dir = shared_build.build_dir
    os.remove(os.path.join(build_dir, "ok"))
    with open(os.path.join(build_dir, "lock"), "w"):
        pass
    holder = hold_build_lock(build_dir + ".lock", 600)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    result = run_builder(shared_build.env)
    assert result["ok"] and result["op_matches"] and not result["cached"]
    assert time.monotonic() - started < 120  # nothing to compile: ninja finds all up to date


def test_corrupt_cached_library_is_rebuilt(shared_build):
    with open(shared_build.library_path, "wb") as f:
        f.write(b"not a shared library")
    result = run_builder(shared_build.env)
    assert result["ok"] and result["op_matches"] and not result["cached"]
    with open(result["log_path"]) as f:
        assert "rebuilt" in f.read()
    again = run_builder(shared_build.env)
    assert again["ok"] and again["cached"]
