"""tools/bench.py runs the three engines side by side and emits well-formed numbers (no timings asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench.py")


def test_bench_tiny_model_emits_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, BENCH, "tiny_vgg", "--batch", "1", "2", "--threads", "1", "--repeat", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "onnxruntime" in proc.stdout and "tvm" in proc.stdout and "torch" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "tiny_vgg" and result["threads"] == 1 and result["schedule"] == "rules"
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    for b in result["batches"]:
        assert b["input_shapes"][0][0] == b["batch"]
        assert b["macs"] > 0 and b["tvm_build_seconds"] > 0
        assert 0 <= b["max_abs_diff_tvm_vs_onnxruntime"] < 1e-4
        assert set(b["engines"]) == {"torch", "onnxruntime", "tvm"}
        for name, e in b["engines"].items():
            assert e["runs"] == 2
            assert 0 < e["min_ms"] <= e["median_ms"] <= e["max_ms"] and math.isfinite(e["max_ms"])
        tvm = b["engines"]["tvm"]
        assert math.isclose(tvm["ratio_to_onnxruntime"], tvm["median_ms"] / b["engines"]["onnxruntime"]["median_ms"])
    assert result["batches"][1]["macs"] == 2 * result["batches"][0]["macs"]


def test_bench_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, BENCH, "tiny_vgg", "--repeat", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr
    for argv, says in ((["tiny_resnet", "--data", "photos"], "takes a named data set"),
                       (["resnet18", "--data", "digits"], "has none; use a tiny zoo model")):
        proc = subprocess.run([sys.executable, BENCH, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_wait_modes_order_the_runs():
    """passive: engines interleaved run by run; spin: blocks per engine (4 rounds), each block
    after the process went idle and one untimed wake-up run."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    every = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench._measure(every, argparse.Namespace(warmup=1, repeat=3, wait="passive"))
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    calls.clear()
    times = bench._measure(every, argparse.Namespace(warmup=1, repeat=6, wait="spin"))
    # warm-up a b; then rounds of 2, 2, 1, 1 timed runs, each block after one untimed run
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2 + ["a"] * 2 + ["b"] * 2
    assert [len(t) for t in times.values()] == [6, 6]
    assert bench._settle(limit_s=1.0) < 1.0  # an idle process settles at once


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_times_the_artifact_on_an_rpc_server_over_loopback(tmp_path):
    """--rpc: the artifact is uploaded to TVM's RPC server (here a local one on loopback), runs
    there with outputs equal to ONNX Runtime's, and is timed on the server's clock; an address
    nobody serves is one line, exit 2."""
    import time

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # the server binds its port
        out = tmp_path / "remote.json"
        proc = subprocess.run([sys.executable, BENCH, "tiny_resnet", "--rpc", f"127.0.0.1:{port}", "--repeat", "3",
                               "--json", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = json.loads(out.read_text())["remote"][0]
        assert row["address"] == f"127.0.0.1:{port}" and len(row["times_ms"]) == 3
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["max_abs_diff"] < 1e-4
    finally:
        server.kill()
        server.wait()
    dead = subprocess.run([sys.executable, BENCH, "tiny_resnet", "--rpc", f"127.0.0.1:{_free_port()}"],
                          capture_output=True, text=True, timeout=600)
    assert dead.returncode == 2 and dead.stderr.startswith("error: cannot reach the RPC server at 127.0.0.1:")
    assert len(dead.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, BENCH, "tiny_resnet", "--rpc", "nohost"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not HOST:PORT" in bad.stderr


def test_bench_integer_mode_runs_sliver_integer_and_ort_int8(tmp_path):
    """--integer: sliver's integer artifact and ONNX Runtime's int8 QDQ path beside the float
    engines, the integer artifact bit-exact against ONNX Runtime, the CPU and its ISA recorded;
    a second --integer pipeline runs in the same rounds as tvm:int2, reported against tvm:int;
    --data runs the trained model on that data's first test image."""
    from trained import trained

    out = tmp_path / "bench.json"
    trained("tiny_resnet")  # the shared cache entry (trained here if this run has none yet)
    proc = subprocess.run(
        [sys.executable, BENCH, "tiny_resnet", "--data", "digits", "--integer", "--integer",
         "pot-naive{wbits=4 abits=4},pot-shift", "--engines", "onnxruntime", "tvm", "--threads", "1",
         "--repeat", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    cpu = result["cpu_info"]
    assert cpu["model"] and cpu["cores"] >= 1 and isinstance(cpu["isa"], list)
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert ("AVX-512 VNNI" in cpu["isa"]) == (" avx512_vnni" in flags)
    b = result["batches"][0]
    assert set(b["engines"]) == {"onnxruntime", "tvm", "tvm:int", "tvm:int2", "onnxruntime:int8"}
    assert b["integer"] == b["integers"][0] and [i["engine"] for i in b["integers"]] == ["tvm:int", "tvm:int2"]
    assert b["integers"][1]["pipeline"] == "pot-naive{wbits=4 abits=4},pot-shift"
    for i in b["integers"]:
        assert i["integer_only"] and i["max_abs_diff_tvm_vs_onnxruntime"] == 0
    e = b["engines"]["tvm:int"]
    assert math.isclose(e["ratio_to_tvm"], e["median_ms"] / b["engines"]["tvm"]["median_ms"])
    assert math.isclose(e["ratio_to_onnxruntime:int8"], e["median_ms"] / b["engines"]["onnxruntime:int8"]["median_ms"])
    e2 = b["engines"]["tvm:int2"]
    assert math.isclose(e2["ratio_to_tvm:int"], e2["median_ms"] / e["median_ms"])
    assert "tvm:int is" in proc.stdout and "tvm:int2 takes" in proc.stdout and "isa:" in proc.stdout
    assert b["input"] == "digits/test[:1]"
