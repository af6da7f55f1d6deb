"""`python -m train.launch --num_processes N [--devices_per_process D] -- <train args>`

Runs `python -m train <train args>` as N processes on this machine that form
one JAX mesh of N x D CPU devices, exactly as N hosts of a TPU pod slice form
one: each process gets `--coordinator_address 127.0.0.1:<free port>
--num_processes N --process_id i` and D fake CPU devices
(`--xla_force_host_platform_device_count`); their collectives go over gloo
(train/distributed.py). Each output line is prefixed with `[i] ` and streamed
as it comes. When a process fails, the others are stopped (SIGTERM, then
SIGKILL) and its exit code is returned; the run itself also stops them
within --heartbeat_timeout, launcher or not.

For testing multi-host code on one machine; on real hosts run
`python -m train` on each (README).
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

STOP_GRACE_SECONDS = 10  # after SIGTERM, before SIGKILL


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    """The environment of one process: CPU only, D fake devices, unbuffered output."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (f"{flags.strip()} "
                        f"--xla_force_host_platform_device_count={devices_per_process}").strip()
    # CPU devices only: on a GPU or TPU host, N processes would otherwise all
    # claim the same accelerators.
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    return env


def command(train_args: Sequence[str], process_id: int, num_processes: int,
            address: str) -> list[str]:
    return [sys.executable, "-m", "train", *train_args, "--coordinator_address", address,
            "--num_processes", str(num_processes), "--process_id", str(process_id)]


def start(train_args: Sequence[str], num_processes: int, devices_per_process: int,
          port: int | None = None, outputs: Sequence[IO] | None = None) -> list[subprocess.Popen]:
    """Starts the processes; their merged stdout/stderr go to `outputs[i]`
    (files), or to pipes for `stream` when None."""
    address = f"127.0.0.1:{port or free_port()}"
    env = process_env(devices_per_process)
    return [subprocess.Popen(command(train_args, i, num_processes, address), env=env,
                             stdin=subprocess.DEVNULL,
                             stdout=outputs[i] if outputs else subprocess.PIPE,
                             stderr=subprocess.STDOUT)
            for i in range(num_processes)]


def stream(procs: Sequence[subprocess.Popen], out: IO = sys.stdout) -> list[threading.Thread]:
    """Copies each process's output to `out`, every line prefixed `[i] `;
    a carriage return (a progress bar redrawing) also ends a line."""
    lock = threading.Lock()

    def pump(i: int, pipe) -> None:
        for line in io.TextIOWrapper(pipe, encoding="utf-8", errors="replace", newline=""):
            if line == "\r":  # a progress bar's "go to column 0" before its redraw
                continue
            with lock:
                out.write(f"[{i}] {line}")
                out.flush()

    threads = [threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    return threads


def describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def supervise(procs: Sequence[subprocess.Popen], out: IO = sys.stdout) -> int:
    """Waits for all; on the first failure stops the rest. Returns 0 or the
    first failing process's code (128 + signal number when it was killed)."""
    ended: queue.Queue = queue.Queue()
    # One waiter per process, so failures are seen in the order they happen
    # (the first is the cause; the others often die of it a moment later).
    for i, p in enumerate(procs):
        threading.Thread(target=lambda i=i, p=p: ended.put((i, p.wait())), daemon=True).start()
    for _ in procs:
        i, code = ended.get()
        if code != 0:
            out.write(f"[launch] process {i} {describe(code)}; stopping the others\n")
            out.flush()
            stop(procs)
            return code if code > 0 else 128 - code
    return 0


def stop(procs: Sequence[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in alive:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: the arguments of python -m train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    procs = start(train_args, args.num_processes, args.devices_per_process, args.port)
    threads = stream(procs)
    try:
        code = supervise(procs)
    except KeyboardInterrupt:
        stop(procs)
        code = 130
    for t in threads:
        t.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main())
