"""Timing an artifact on another device through TVM's RPC.

A user measures on their own board (or a device farm) by running TVM's RPC server there::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090               # on the device
    python tools/bench.py resnet18 --target arm --rpc DEVICE:9090           # here

or, with a tracker that hands out devices by key::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key rk3399      # on each device
    python tools/bench.py resnet18 --target arm --rpc TRACKER:9190 --rpc-key rk3399

:func:`time_remote` uploads the artifact's shared library, loads it into a Relax VM on the device's
CPU, checks its outputs against a local reference and times ``main`` with TVM's time evaluator
(on the device's clock). The artifact must be built for the device's target
(``backends.tvm.build(program, target=...)``); the device needs the TVM runtime of the same
version (``pip install apache-tvm`` there, or the runtime ``make setup-arm`` builds for aarch64).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Sequence

import numpy as np

from ..ir.errors import BackendError
from .tvm import _to_numpy


def parse_address(text: str) -> tuple:
    """``HOST:PORT`` -> (host, port), with a one-line error for anything else."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"--rpc {text!r} is not HOST:PORT (e.g. 192.168.1.20:9090)")
    return host, int(port)


def connect(address: str, key: str | None = None, timeout: float = 10.0):
    """An RPC session to the server at ``address`` (``HOST:PORT``), or, with ``key``, to a device
    of that key from the tracker at ``address``."""
    from tvm import rpc

    host, port = parse_address(address)
    try:
        if key:
            return rpc.connect_tracker(host, port).request(key, session_timeout=0, max_retry=3)
        return rpc.connect(host, port, session_timeout=0)
    except Exception as e:  # refused, unreachable, no device of that key: all one line for the user
        what = f"the RPC tracker at {host}:{port} (key {key!r})" if key else f"the RPC server at {host}:{port}"
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BackendError(
            f"cannot reach {what}: {msg}; start one on the device with "
            "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`"
        ) from None


def time_remote(artifact, address: str, inputs: Sequence, *, key: str | None = None, repeat: int = 10,
                number: int = 1, reference: Sequence | None = None) -> dict:
    """Run ``artifact`` (a :class:`sliver.backends.tvm.Artifact`) on the device at ``address`` and
    time it there.

    Returns ``{"address", "key", "median_ms", "min_ms", "max_ms", "times_ms", "max_abs_diff"}``:
    ``repeat`` timings of ``number`` calls each (milliseconds per call, the device's clock), and
    the largest difference of the device's outputs from ``reference`` (the local outputs, when
    given; ``None`` otherwise)."""
    import tvm
    from tvm import relax

    if repeat < 1 or number < 1:
        raise BackendError("repeat and number must be >= 1")
    session = connect(address, key)
    with tempfile.TemporaryDirectory(prefix="sliver-rpc-") as tmp:
        paths = artifact.save(tmp)
        library = paths["library"]
        try:
            session.upload(library, os.path.basename(library))
            module = session.load_module(os.path.basename(library))
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BackendError(
                f"the device at {address} could not load the artifact built for {artifact.target}: {msg}; "
                "build for the device's target (--target) with the same TVM version on both sides"
            ) from None
    device = session.cpu()
    vm = relax.VirtualMachine(module, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), device=device) for x in inputs]
    outputs = _to_numpy(vm["main"](*args))
    diff = None
    if reference is not None:
        diff = max(float(np.max(np.abs(o.astype(np.float64) - np.asarray(r, dtype=np.float64)))) if o.size else 0.0
                   for o, r in zip(outputs, reference))
    timer = vm.time_evaluator("main", device, number=number, repeat=repeat)
    times = [1e3 * t for t in timer(*args).results]
    return {
        "address": address,
        "key": key,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "times_ms": times,
        "max_abs_diff": diff,
    }
