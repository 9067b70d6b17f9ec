"""Running generated programs (HumanEval's check) in a sandbox: a subprocess in its own session,
with a wall-clock timeout (the whole process group is killed), CPU-time, memory, file-size and
process-count limits, no network, an empty working directory and an isolated interpreter (-I).

No network: the program runs in a new network namespace (`unshare -rn`: only a loopback that is
down) where the kernel allows one; otherwise socket creation is disabled inside the interpreter
before the program runs. `isolation()` says which, and results carry it.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

# Runs before the program when no network namespace is available: every socket refuses to exist.
_SOCKET_GUARD = """
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
_s.socketpair = _no_network
del _s, _no_network
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed" | "failed" | "timeout"
    stderr_tail: str


@lru_cache(maxsize=1)
def isolation() -> str:
    """'netns' when `unshare -rn` works here, else 'python-guard'."""
    unshare = shutil.which("unshare")
    if unshare:
        try:
            if subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                return "netns"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "python-guard"


def _limits(cpu_s: int, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, timeout_s: float = 10.0, memory_bytes: int = 2 * 2**30) -> Outcome:
    """Run `source` as a Python program; passed when it exits 0 within the limits."""
    program = source if isolation() == "netns" else _SOCKET_GUARD + source
    with tempfile.TemporaryDirectory(prefix="sandbox_") as cwd:
        cmd = [sys.executable, "-I", "-c", program]
        if isolation() == "netns":
            cmd = [shutil.which("unshare"), "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=lambda: _limits(int(timeout_s) + 1, memory_bytes))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", "")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left running
            except ProcessLookupError:
                pass
    tail = err.decode("utf-8", "replace")[-2000:]
    return Outcome(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", tail)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's evaluation runs: the prompt and completion, the test code, and
    check(<entry point>)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, test: str) -> str:
    """MBPP's check (Austin et al.): the generated code, then the item's setup code and asserts."""
    return f"{completion}\n\n{test}\n"
