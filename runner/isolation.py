"""Isolation: a CPU variant runs in a process of its own, forked from a server that imported once.

Importing torch and transformers takes 5-10 s on a small machine. A fresh interpreter per variant
pays that every time, and it was most of what a sweep spent outside the variants' work. Here a fork
server (a single-threaded process) imports them once and forks a new process for every variant:
fresh memory peaks, fresh thread pools, nothing left over from the variant before. The caller only
waits on a socket meanwhile. A CPU fine-tune comes here too. CUDA work does not: a CUDA context
cannot cross a fork, so it runs in a fresh Ray worker.

Whoever knows early that variants will run on this machine starts the server ahead of time:
`quantbench run` does before it starts its embedded Ray cluster, so the imports run while Ray
starts. The cluster's processes inherit its address (QUANTBENCH_FORK_SERVER). Elsewhere, a worker
starts its own server at its first call.

For each call the server forks a supervisor, which forks the process that runs the function. The
supervisor reports that process's exit code if it dies before it answers, and kills it if the caller
goes away; what that process started and left behind is killed when the call ends. The server, the
supervisors and the processes they fork die with their parents (on Linux), so stopping the server
stops the calls it runs.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import pickle
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError, reduction
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge, wait
from typing import Any

# What the server imports before it forks: the heavy, model-independent part of a variant's imports.
# Not the fine-tune's module: transformers' Trainer imports torchao (1.5 s, and its notices on the
# terminal), which a sweep without a fine-tune never needs; a fine-tune's process imports it.
PRELOAD = [
    "torch",
    "runner.worker",
    "runner.analysis",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
]

# What the server prepares beside PRELOAD when the job has compiled CPU variants: inductor imported
# (1.3-2.9 s per process on 2 cores, after PRELOAD), then a toy model compiled once, which sets up
# what every process's first compile sets up (pattern passes, the C++ toolchain's checks): 4 s per
# process with a warm inductor cache, 21 s with a cold one (a tiny BERT: 7.9 s to its first output
# compiled alone, 3.7 s after the toy). Only then: it adds about 60 MiB to every forked process's
# RSS. "module:function" entries are called once imported.
COMPILE_PRELOAD = ["torch._inductor.compile_fx", "runner.worker:warm_up_compiler"]

# "NAME KEY": the abstract Unix socket a server on this machine listens on, and its authentication
# key.
ADDRESS_VARIABLE = "QUANTBENCH_FORK_SERVER"


# How long a caller has to prove the key and send its call: a connection that never sends is
# dropped.
AUTHENTICATION_DEADLINE_S = 10


class ProcessDied(RuntimeError):
    """The variant's process ended (killed, crashed, out of memory) before it returned a result."""


class RaisedInProcess(RuntimeError):
    """What the function raised in its own process, as "TypeName: message" (the error itself may
    not cross back)."""


def socket_address(name: str) -> str:
    """Linux: an abstract Unix socket, which leaves no file behind; any local user can connect to
    it, so the server turns away other users' processes (SO_PEERCRED) before it reads a byte.
    Elsewhere a socket file, which other users cannot write to (the umask). The key is checked
    either way, by the call's own supervisor, within a deadline."""
    if sys.platform.startswith("linux"):
        return "\0" + name
    return os.path.join(tempfile.gettempdir(), name)


@dataclass
class ForkServer:
    name: str
    key: bytes
    process: subprocess.Popen | None = None  # when this process started it

    @property
    def address(self) -> str:
        return socket_address(self.name)

    def describe(self) -> str:
        return f"{self.name} {self.key.hex()}"

    def stop(self) -> None:
        """Stops a server this process started; the processes it forked die with it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(also_import: list[str] = ()) -> ForkServer:
    """Starts a fork server and returns once it listens (a fraction of a second): it imports while
    the caller goes on. Calls made before it is ready wait for it."""
    server = ForkServer(name=f"quantbench-fork-{secrets.token_hex(8)}", key=secrets.token_bytes(32))
    setup = json.dumps(
        {
            "name": server.name,
            "key": server.key.hex(),
            "modules": PRELOAD + list(also_import),
            "sys_path": sys.path,
            "parent": os.getpid(),
            "deadline_s": AUTHENTICATION_DEADLINE_S,
        }
    )
    # The setup goes through a pipe: a command line, key included, is visible to every user.
    # One OpenMP thread while importing: otherwise importing torch and transformers starts OpenMP's
    # pool (2 more threads on 2 cores), and a process forked from a threaded one inherits a broken
    # pool. A forked process sets its own thread count (the job's `threads`). A session of its own:
    # Ctrl-C and Ctrl-Z at the terminal reach `quantbench run`, which stops the server.
    server.process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys; setup = json.loads(sys.stdin.readline()); "
            "sys.path[:] = setup['sys_path']; from runner.isolation import serve; serve(setup)",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    server.process.stdin.write(setup.encode() + b"\n")
    server.process.stdin.close()
    if server.process.stdout.readline() != b"listening\n":  # blocks, no polling
        server.process.wait()
        raise RuntimeError(
            f"the fork server ended with exit code {server.process.returncode} before it listened"
        )
    server.process.stdout.close()
    return server


def server_from_environment() -> ForkServer | None:
    value = os.environ.get(ADDRESS_VARIABLE, "").split()
    return ForkServer(name=value[0], key=bytes.fromhex(value[1])) if len(value) == 2 else None


_own_server: ForkServer | None = None


def run_in_fresh_process(function: Callable[..., Any], *args, also_import: list[str] = ()) -> Any:
    """function(*args) in a new process forked from a warm server; its result or its error.

    The server is the one named in the environment, else one this process starts at its first call,
    importing also_import beside PRELOAD.
    """
    global _own_server
    if getattr(function, "__module__", None) == "__main__":
        raise ValueError(
            f"{function.__name__} is defined in the main script: the process that runs it imports "
            "it "
            "by its module's name, so it must live in an importable module"
        )
    server = server_from_environment()
    try:
        connection = Client(server.address, "AF_UNIX", authkey=server.key) if server else None
    except OSError:  # named, but gone: its owner has stopped it
        connection = None
    if connection is None:
        if _own_server is None:
            _own_server = start_server(also_import)
        connection = Client(_own_server.address, "AF_UNIX", authkey=_own_server.key)
    with connection:
        connection.send_bytes(
            pickle.dumps((sys.path, os.getcwd(), dict(os.environ)))
        )  # where it runs first
        connection.send_bytes(pickle.dumps((function, args)))
        for fd in (1, 2):  # the process writes where this one writes (a Ray worker: its log files)
            reduction.send_handle(connection, fd, None)
        try:
            kind, value = connection.recv()  # blocks; no polling beside the timed passes
        except EOFError:
            raise ProcessDied(
                "the fork server's process for this call ended before the variant's process "
                "returned a result (the server was stopped or killed)"
            ) from None
    if kind == "ok":
        return value
    if kind == "error":
        raise RaisedInProcess(value)
    pid, code = value
    how = f"was killed by signal {code_name(-code)}" if code < 0 else f"ended with exit code {code}"
    raise ProcessDied(
        f"the variant's process (pid {pid}) {how} before it returned a result "
        "(killed, crashed or out of memory: the out-of-memory killer sends SIGKILL)"
    )


def code_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


# ---------------------------------------------------------------------------------------------
# The server's side.


def serve(setup: dict) -> None:
    """The server: listen first (callers queue meanwhile), import, then fork a supervisor per
    call."""
    _die_with_parent()
    if os.getppid() != setup["parent"]:  # it ended before this process could follow it
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_address(setup["name"]))
    listener.listen(64)
    with open(
        1, "wb", closefd=False
    ) as starter:  # the starter waits for this line, then closes the pipe
        starter.write(b"listening\n")
    quiet = os.open(os.devnull, os.O_WRONLY)  # a forked process writes where its caller writes
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    for module in setup["modules"]:
        prepare(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    key = bytes.fromhex(setup["key"])
    while True:  # only accepts: a caller that never sends stalls its own supervisor, not this loop
        try:
            peer, _ = listener.accept()
        except OSError:
            continue
        if not same_user(
            peer
        ):  # an abstract socket has no permissions: refused before a byte is read
            peer.close()
            continue
        if os.fork() == 0:
            listener.close()
            _supervise(Connection(peer.detach()), key, setup["deadline_s"])  # never returns
        peer.close()


def prepare(entry: str) -> None:
    """Imports a module of the preload; "module:function" then calls its function. A failure is
    left to the variant's process, which imports (and compiles) what it needs and reports it."""
    name, _, function = entry.partition(":")
    try:
        module = importlib.import_module(name)
        if function:
            getattr(module, function)()
    except Exception:
        pass


def same_user(peer: socket.socket) -> bool:
    """Whether the process at the other end runs as this user (Linux: SO_PEERCRED; elsewhere the
    socket file's permissions keep other users out)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        _, uid, _ = struct.unpack(
            "3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
    except OSError:
        return False
    return uid == os.getuid()


def _authenticated_request(
    connection, key: bytes, deadline_s: int
) -> tuple[list[bytes], list[int]]:
    """The caller's key checked, then its call and its output descriptors read, within the deadline
    (SIGALRM ends this supervisor, and with it the connection)."""
    signal.alarm(deadline_s)
    deliver_challenge(connection, key)
    answer_challenge(connection, key)
    request = [connection.recv_bytes(), connection.recv_bytes()]
    output = [reduction.recv_handle(connection) for _ in (1, 2)]
    signal.alarm(0)
    return request, output


def _supervise(connection, key: bytes, deadline_s: int) -> None:
    """Checks the caller's key, forks the process that runs the call and waits for whichever ends
    first: that process (its exit code goes to the caller, who reads it only if no answer came
    before) or the caller (the process is killed: nobody waits for its result)."""
    code = 1
    try:
        _die_with_parent()
        try:
            request, output = _authenticated_request(connection, key, deadline_s)
        except (
            OSError,
            EOFError,
            AuthenticationError,
        ):  # a caller that went away or had the wrong key
            return
        # The child's end arrives as SIGCHLD, which writes a byte into this pipe: waitable beside
        # the connection, and never missed, even if the child ends before the wait begins.
        child_ended, on_signal = os.pipe()
        os.set_blocking(on_signal, False)
        signal.set_wakeup_fd(on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(child_ended)
            os.close(on_signal)
            _run_call(connection, request, output)  # never returns
        for fd in output:
            os.close(fd)
        if connection in wait([connection, child_ended]) and not _readable(child_ended):
            os.kill(pid, signal.SIGKILL)  # the caller went away
        _, status = os.waitpid(pid, 0)
        try:  # what the process started and left behind (a data loader's workers, say)
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            connection.send(("died", (pid, os.waitstatus_to_exitcode(status))))
        except OSError:
            pass
        code = 0
    finally:
        os._exit(code)


def _readable(fd: int) -> bool:
    return bool(wait([fd], timeout=0))


def _run_call(connection, request: list[bytes], output: list[int]) -> None:
    code = 1
    try:
        _die_with_parent()
        os.setpgid(0, 0)  # a group of its own: what it starts is killed with it when the call ends
        for fd, caller_fd in zip((1, 2), output):
            os.dup2(caller_fd, fd)
            os.close(
                caller_fd
            )  # received inheritable: a program this process runs would keep it open
        try:
            sys.path[:], cwd, environment = pickle.loads(request[0])
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environment)  # the caller's, as if it had started this process
            function, args = pickle.loads(request[1])  # imports the function's module
            outcome = ("ok", function(*args))
        except BaseException as error:  # reported to the caller, which fails the variant with it
            outcome = ("error", f"{type(error).__name__}: {error}")
        for stream in (
            sys.stdout,
            sys.stderr,
        ):  # before the answer: the caller may go once it has it
            stream.flush()
        try:
            connection.send(outcome)
        except Exception as error:  # a result that cannot be pickled
            connection.send(
                ("error", f"the result could not be sent back: {type(error).__name__}: {error}")
            )
        code = 0
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: this process is killed when the process that started it ends, never orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
