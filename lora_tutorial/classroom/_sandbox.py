"""The disposable runner of one submission: ``python -m lora_tutorial.classroom._sandbox JOB.json``.

It is started by the grader (``grading.py``), inside fresh user, network, PID and mount namespaces
where the system allows them (``unshare``), else in a new session. It locks itself down (read-only
file systems except its own folder, loopback-only network, resource limits), then runs the
submission cell by cell in a Jupyter kernel and, after each attempted answer cell, runs that
exercise's *probe* in the kernel, which writes the answer's outputs on the check's inputs as plain
data to ``probe-LABEL.json``. Each answer cell's outcome is appended to ``results.jsonl``.

Everything this process and the kernel write is untrusted: student code runs next to it and may
forge or delete any of it. The grader therefore only reads these files as data, with size limits,
and decides every verdict itself; see ``grading.py``.
"""

from __future__ import annotations

import fcntl
import json
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

_TIMEOUT = "CellTimeout"


class _Client(NotebookClient):
    """A notebook client that keeps no output: a submission's prints cannot fill memory."""

    def output(self, *args: Any, **kwargs: Any) -> None:
        return None


def _loopback_up() -> None:
    """Bring up ``lo`` in a new network namespace (the kernel talks to us over 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, request)[:18])[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP


def _read_only_except(folder: Path) -> int:
    """Remount every file system read-only except ``folder`` (and /proc, /dev, /sys)."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(("/proc", "/sys", "/dev")) or point.startswith(str(folder)):
            continue
        points.append(point)
    failed = 0
    for point in points:
        done = subprocess.run(
            ["mount", "-o", "remount,bind,ro", point], capture_output=True, check=False
        )
        failed += done.returncode != 0
    return failed


def _limit(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def _reply(outcome: dict[str, Any]) -> tuple[str, str]:
    content = outcome.get("content", {})
    if content.get("status") != "error":
        return "ok", ""
    if content.get("ename") == _TIMEOUT:
        return "timeout", ""
    return "error", f"{content.get('ename')}: {content.get('evalue')}"[:500]


def run(job: dict[str, Any]) -> None:
    folder = Path(job["folder"])
    results = open(folder / "results.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def record(**row: Any) -> None:
        results.write(json.dumps(row) + "\n")
        results.flush()

    nb = nbformat.read(folder / "work" / "submission.ipynb", as_version=4)
    answers = {int(i): a for i, a in job["answers"].items()}
    deadline = time.monotonic() + job["notebook_timeout"]
    km = AsyncKernelManager(kernel_name="python3")
    km.connection_file = str(folder / "kernel.json")
    client = _Client(
        nb,
        km=km,
        timeout=job["cell_timeout"],
        allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": _TIMEOUT, "evalue": "", "traceback": []},
        shutdown_kernel="immediate",
        resources={"metadata": {"path": str(folder / "work")}},
    )
    last: dict[str, Any] = {}
    client.on_cell_executed = lambda **kw: last.update(reply=kw.get("execute_reply") or {})

    def execute(cell: nbformat.NotebookNode, index: int | None = None) -> tuple[str, str]:
        client.timeout = max(1, min(job["cell_timeout"], int(deadline - time.monotonic())))
        last.clear()
        if index is None:
            nb.cells.append(cell)
            try:
                client.execute_cell(cell, len(nb.cells) - 1)
            finally:
                nb.cells.pop()
        else:
            client.execute_cell(cell, index)
        return _reply(last.get("reply", {}))

    with client.setup_kernel(cwd=str(folder / "work"), stderr=subprocess.DEVNULL):
        for index, cell in enumerate(list(nb.cells)):
            if cell.cell_type != "code":
                continue
            if deadline - time.monotonic() <= 0:
                record(event="notebook-timeout")
                return
            answer = answers.get(index)
            try:
                kind, message = execute(cell, index)
                hung = kind == "timeout" and execute(nbformat.v4.new_code_cell("pass"))[0] != "ok"
                if answer is not None:
                    label, out = answer["label"], folder / f"probe-{answer['label']}.json"
                    if kind == "ok":
                        probe = (
                            f"import {answer['module']} as _lt_m\n"
                            "from lora_tutorial.exercises._feedback import encode as _lt_e\n"
                            f"with open({str(out)!r}, 'w') as _lt_f:\n"
                            f"    _lt_f.write(_lt_e(_lt_m.{answer['check']}.probe("
                            f"{answer['function']})))"
                        )
                        kind, message = execute(nbformat.v4.new_code_cell(probe))
                        record(label=label, kind=kind, message=message, stage="check")
                    else:
                        record(label=label, kind=kind, message=message, stage="answer")
                if hung:
                    record(event="hung", cell=index)
                    return
            except DeadKernelError:
                record(event="died")
                return
    record(event="done")


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    folder = Path(job["folder"])
    if job["namespaces"]:
        _loopback_up()
        failed = _read_only_except(folder)
        (folder / "sandbox.json").write_text(json.dumps({"mounts_left_writable": failed}))
    _limit(job["limits"])
    run(job)


if __name__ == "__main__":
    main(sys.argv[1])
