"""A fork server for the tests: imports torch once, then runs each requested command in a forked child.

Starting Python and importing torch costs about 4 seconds on a 2-core CPU, more than most commands of the tests
take themselves. conftest.run sends this process one request per command (argv, working directory, environment)
with the three file descriptors for stdin, stdout and stderr; it forks, and the child runs the script as
`python SCRIPT args...` would: its own process, `__main__`, `sys.argv`, the given descriptors as 0/1/2, the
interpreter's own handling of SystemExit, uncaught exceptions and exit. Fork after `import torch` is what a
DataLoader with fork workers does; nothing here computes with torch, so no thread pool exists yet.

Protocol (one AF_UNIX SOCK_SEQPACKET socket, fd in argv[1]): request = JSON {argv, cwd, env} + 3 fds;
replies = JSON {"pid": N}, then JSON {"status": exit status as subprocess gives it}. An empty message ends it.
"""
import contextlib
import io
import json
import os
import runpy
import socket
import sys
import warnings

import cv2
import matplotlib
import pandas
import torch
import torch._dynamo
import torchvision
import tqdm

# The point of this process: what the scripts import (torch, torchvision, cv2, pandas, tqdm, matplotlib's Agg backend,
# and torch._dynamo, which the optimizers import on their first step) is imported once and shared by every fork.
PRELOADED = (cv2, pandas, torch, torch._dynamo, torchvision, tqdm)
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402

try:  # torch's ONNX exporter (`export`); not onnxruntime, whose import starts threads that a fork breaks
    import onnx
    import onnxscript
    import torch.onnx
    PRELOADED += (onnx, onnxscript)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's lazy imports, once
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(2, 2),), dynamo=True)
except ImportError:  # optional packages: without them the export tests fail on their own
    pass


def child(request, fds):
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  write_through=True)
    warnings.resetwarnings()
    if os.environ.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)  # falls through to the interpreter's exit: atexit handlers, flush, status


def main():
    sock = socket.socket(fileno=int(sys.argv[1]))
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        if not message:
            return
        pid = os.fork()
        if pid == 0:
            sock.close()
            child(json.loads(message), fds)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        sock.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())


if __name__ == "__main__":
    main()
