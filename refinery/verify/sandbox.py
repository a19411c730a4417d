"""Run untrusted generated Python (a math expression, a function and its tests) in a contained subprocess.

Each run is a fresh ``python -I -S`` in its own session, in a temporary folder that is removed afterwards, with:

- a wall-clock timeout (the whole process group is killed) and a CPU-time limit (``RLIMIT_CPU``);
- an address-space limit (``RLIMIT_AS``) and a file-size limit (``RLIMIT_FSIZE``);
- no network: a new network namespace where the kernel allows unprivileged user namespaces (only a loopback that is
  down), and in every case an audit hook (:func:`sys.addaudithook`, which code cannot remove) that refuses sockets,
  new processes (``fork``, ``exec``, ``subprocess``, ``os.system``), signals to other processes and ``ctypes``;
- no writes outside the temporary folder: the same hook refuses opening a file for writing, removing, renaming or
  changing any path outside it;
- an empty environment (no proxy, no key, no ``PYTHONPATH``).

The audit hook is the containment that holds on every machine; the namespace, where it exists, is a second wall
for the network. ``isolation()`` says which a run had.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

_MARK = "\x00refinery-sandbox-result\x00"
_NETNS_FLAGS = 0x10000000 | 0x40000000  # CLONE_NEWUSER | CLONE_NEWNET

# The child: read the task from stdin, install the hook, run the code, print one marked JSON line.
_RUNNER = r'''
import json, os, resource, sys
_cfg = json.loads(sys.stdin.readline())  # the limits, set here (a fresh single-threaded process) before any code
for _name, _value in _cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
if _cfg["netns"]:
    import ctypes
    ctypes.CDLL(None, use_errno=True).unshare(%(flags)d)
    del ctypes
_root = os.path.realpath(os.getcwd())
_task = json.loads(sys.stdin.read())
_mark, _dumps, _write, _flush = %(mark)r, json.dumps, sys.__stdout__.write, sys.__stdout__.flush
_realpath, _fsdecode, _sep = os.path.realpath, os.fsdecode, os.sep
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NEVER = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "os.fork", "os.forkpty",
                    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg",
                    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.startfile",
                    "sys.addaudithook", "os.setuid", "os.chroot", "_posixsubprocess.fork_exec"))
_PATHS = frozenset(("os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate", "os.chmod", "os.chown",
                    "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"))

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor: its opening was checked
    try:
        p = _realpath(_fsdecode(path))
    except Exception:
        return False
    return p == _root or p.startswith(_root + _sep)

def _hook(event, args):
    if event in _NEVER:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
    elif event in _PATHS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} outside the sandbox is not allowed")

sys.addaudithook(_hook)
_out = {"ok": True, "value": None, "error_type": None, "error": None}
try:
    if _task["mode"] == "eval":
        _v = eval(compile(_task["code"], "<expression>", "eval"), {"__name__": "sandbox"})
        _out["value"] = float(_v) if isinstance(_v, (int, float)) and not isinstance(_v, bool) else repr(_v)
    else:
        exec(compile(_task["code"], "<code>", "exec"), {"__name__": "sandbox"})
except BaseException as _e:
    _out.update(ok=False, error_type=type(_e).__name__, error=str(_e)[:300])
_write(_mark + _dumps(_out) + "\n")
_flush()
'''

_FILL = {"mark": _MARK, "flags": _NETNS_FLAGS}


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use."""

    timeout_s: float = 3.0  # wall clock, then the process group is killed
    cpu_s: int = 3  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    file_mb: int = 1  # largest file it may write (RLIMIT_FSIZE)


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run.

    status: ``ok`` (ran to the end), ``error`` (an exception, or killed by a limit other than time), ``timeout``.
    value: an expression's value (a float when it is a number, else its repr); None for code.
    error_type, error: the exception's class name and message (``error``), or what killed the run.
    """

    status: Literal["ok", "error", "timeout"]
    value: float | str | None
    error_type: str | None
    error: str | None


_ISOLATION: dict[str, bool] = {}


def isolation() -> str:
    """``namespace+audit_hook`` where unprivileged network namespaces work on this machine, else ``audit_hook``."""
    if "netns" not in _ISOLATION:
        probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({_NETNS_FLAGS}) != 0)"
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, timeout=30)
            _ISOLATION["netns"] = r.returncode == 0
        except (subprocess.SubprocessError, OSError):
            _ISOLATION["netns"] = False
    return "namespace+audit_hook" if _ISOLATION["netns"] else "audit_hook"


def run_python(code: str, mode: Literal["eval", "exec"], limits: Limits = Limits()) -> RunResult:
    """Evaluate an expression (``eval``) or run a program (``exec``: a function and its asserts) contained.

    Args:
        code: the untrusted source.
        mode: ``eval`` returns the expression's value; ``exec`` succeeds when the code raises nothing.
        limits: time, CPU, memory and file-size limits.

    Returns:
        What happened; never raises for anything the code does.
    """
    netns = isolation() == "namespace+audit_hook"
    with tempfile.TemporaryDirectory(prefix="refinery-sandbox-") as tmp:
        # no preexec_fn (unsafe with threads: the gate runs sandboxes from a thread pool): the child sets its own
        # limits and namespace before it reads the code
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _RUNNER % _FILL], cwd=tmp,
                                env={"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        mb = 1024 * 1024
        cfg = {"netns": netns, "rlimits": {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_mb * mb,
                                           "RLIMIT_FSIZE": limits.file_mb * mb, "RLIMIT_CORE": 0}}
        task = json.dumps(cfg) + "\n" + json.dumps({"mode": mode, "code": code})
        try:
            out, err = proc.communicate(task.encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult("timeout", None, "Timeout", f"killed after {limits.timeout_s:g} s")
        finally:
            _kill_group(proc)  # anything the run left behind in its session
    return _result(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _result(returncode: int, out: str, err: str) -> RunResult:
    line = next((x for x in reversed(out.splitlines()) if x.startswith(_MARK)), None)
    if line is None:  # killed by a limit, or crashed before it could answer
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return RunResult("timeout", None, "Timeout", f"CPU time limit (signal {-returncode})")
        tail = err.strip().splitlines()[-1:] or [f"exit code {returncode}"]
        return RunResult("error", None, "Crash", tail[0][:300])
    got: dict[str, Any] = json.loads(line[len(_MARK):])
    if got["ok"]:
        return RunResult("ok", got["value"], None, None)
    return RunResult("error", None, got["error_type"], got["error"])
