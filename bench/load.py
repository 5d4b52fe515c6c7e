"""Model load benchmark: plain `onnxruntime.InferenceSession(path)` against pipeserve's mapped
load (`pipeserve pack` + `open_session`), side by side, on a generated transformer-like model.

Measured per variant, each in a fresh process (so peak RSS is the load's own):
- time to READY (session created), peak RSS at READY and after the first inference, first
  inference latency, anonymous (private) vs file-backed resident memory;
- two instances of the model in one process: RSS and PSS;
- steady-state throughput: all variants in one process, runs interleaved so drift on a shared
  machine hits them alike;
- which onnxruntime API takes OrtValues over a mapping without copying (add_initializer,
  add_external_initializers, add_external_initializers_from_files_in_memory);
- cold page cache (only where `echo 1 > /proc/sys/vm/drop_caches` works): READY and first
  inference, without prefetch, with madvise(WILLNEED) and with parallel readers.

Variants: plain (the original model by path, default options); mapped (the packed folder through
open_session: the pack-time CPU graph with serialised pre-packed weights); mapped-noprepack
(open_session with prepack=False: the portable graph, pre-packing off); served (the packed folder
through the server's own runtime path, create_instances: READY on a fast-start session without
pre-packing, then swapped for a pre-packed one in the background; "upgraded" is when that swap is
done, and throughput and memory are measured after it).

    .venv/bin/python bench/load.py --size-gb 1 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeserve.runtime.instances import SessionInstances, create_instances, plan_instances
from pipeserve.weights.external_data import external_refs, set_external
from pipeserve.weights.mapping import open_session
from pipeserve.weights.pack import pack_model

CPU = ["CPUExecutionProvider"]
VARIANTS = ("plain", "mapped", "mapped-noprepack", "served")
HEAD_DIM = 64

# --- the model ----------------------------------------------------------------------------------


def generate(path: Path, size_bytes: int, dim: int, seed: int = 0) -> int:
    """Write a transformer-like model (pre-norm blocks: multi-head attention + 4x MLP, fp32) whose
    weights total about `size_bytes`, streaming them into ONNX external data (4 KiB-aligned, like
    onnx.save_model). Returns the weight bytes."""
    rng = np.random.default_rng(seed)
    per_layer = 12 * dim * dim * 4
    layers = max(1, round(size_bytes / per_layer))
    heads = dim // HEAD_DIM
    data_name = path.name + ".data"
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    total = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / data_name, "wb") as f:

        def weight(name: str, shape: list[int], scale: float = 0.02) -> str:
            nonlocal total
            array = rng.standard_normal(shape, dtype=np.float32)
            array *= scale
            offset = -(-f.tell() // 4096) * 4096
            f.seek(offset)
            f.write(array.data)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            set_external(tensor, data_name, offset, array.nbytes)
            inits.append(tensor)
            total += array.nbytes
            return name

        def const(name: str, values: list[int]) -> str:
            inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
            return name

        split = const("split_heads", [0, 0, heads, HEAD_DIM])
        merge = const("merge_heads", [0, 0, dim])
        inits.append(numpy_helper.from_array(np.array(HEAD_DIM**-0.5, np.float32), "scale"))
        x = "x"
        for i in range(layers):
            p = f"l{i}_"

            def node(op: str, inputs: list[str], out: str, p: str = p, **attrs: Any) -> str:
                nodes.append(helper.make_node(op, inputs, [p + out], **attrs))
                return p + out

            h = node(
                "LayerNormalization",
                [x, weight(p + "ln1_g", [dim], 1.0), weight(p + "ln1_b", [dim])],
                "h",
                axis=-1,
            )
            qkv = {}
            for n in "qkv":
                proj = node("MatMul", [h, weight(p + "w" + n, [dim, dim])], n + "0")
                proj = node("Add", [proj, weight(p + "b" + n, [dim])], n + "1")
                proj = node("Reshape", [proj, split], n + "2")
                perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
                qkv[n] = node("Transpose", [proj], n, perm=perm)
            s = node("MatMul", [qkv["q"], qkv["k"]], "s")
            s = node("Mul", [s, "scale"], "ss")
            a = node("Softmax", [s], "a", axis=-1)
            c = node("MatMul", [a, qkv["v"]], "c")
            c = node("Transpose", [c], "ct", perm=[0, 2, 1, 3])
            c = node("Reshape", [c, merge], "cm")
            o = node("MatMul", [c, weight(p + "wo", [dim, dim])], "o0")
            o = node("Add", [o, weight(p + "bo", [dim])], "o")
            r = node("Add", [x, o], "r1")
            h2 = node(
                "LayerNormalization",
                [r, weight(p + "ln2_g", [dim], 1.0), weight(p + "ln2_b", [dim])],
                "h2",
                axis=-1,
            )
            f1 = node("MatMul", [h2, weight(p + "w1", [dim, 4 * dim])], "f0")
            f1 = node("Add", [f1, weight(p + "b1", [4 * dim])], "f1")
            f1 = node("Gelu", [f1], "f2")
            f2 = node("MatMul", [f1, weight(p + "w2", [4 * dim, dim])], "f3")
            f2 = node("Add", [f2, weight(p + "b2", [dim])], "f4")
            x = node("Add", [r, f2], "out")
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "transformer_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save_model(model, str(path))
    return total


# --- measurements (each run in a child process) -------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _smaps_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) / 1024
    return out


def _peak_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child would
    # report its parent's peak (the pack step's) instead of its own.
    return _status_mb("VmHWM")


class _Served:
    """The server's runtime (one CPU instance) behind the session.run() call the bench uses."""

    def __init__(self, work: Path) -> None:
        plan = plan_instances([("CPU", 1, [])], {})
        self.instances: SessionInstances = create_instances(
            work / "packed" / "model.onnx", plan, "bench"
        )

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.instances.run(0, feeds, ["y"])["y"]]


def _open(variant: str, work: Path, prefetch: str = "willneed") -> tuple[Any, Any]:
    if variant == "plain":
        return ort.InferenceSession(str(work / "model.onnx"), providers=CPU), None
    if variant == "served":
        served = _Served(work)
        return served, served.instances
    return open_session(
        work / "packed" / "model.onnx",
        CPU,
        ort.SessionOptions(),
        prefetch=prefetch,
        prepack=variant != "mapped-noprepack",
    )  # type: ignore[arg-type]


def _input(dim: int, seq: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, seq, dim), dtype=np.float32)


def child_load(work: Path, variant: str, prefetch: str, dim: int) -> dict[str, float]:
    x = _input(dim, 128)
    base = _status_mb("VmRSS")
    started = time.perf_counter()
    session, weights = _open(variant, work, prefetch)
    ready = time.perf_counter() - started
    peak_ready = _peak_mb()
    anon_ready = _status_mb("RssAnon")
    started_first = time.perf_counter()
    session.run(None, {"x": x})
    first = time.perf_counter() - started_first
    if variant == "served":
        weights.wait_upgraded()  # memory below is after the pre-packed session took over
        session.run(None, {"x": x})
    upgraded = time.perf_counter() - started
    result = {
        "ready_s": ready,
        "first_s": first,
        "base_rss_mb": base,
        "peak_ready_mb": peak_ready,
        "peak_first_mb": _peak_mb(),
        "anon_ready_mb": anon_ready,
        "anon_first_mb": _status_mb("RssAnon"),
        "file_first_mb": _status_mb("RssFile"),
        "upgraded_s": upgraded if variant == "served" else ready,
    }
    del session, weights
    return result


def child_two(work: Path, variant: str, dim: int) -> dict[str, float]:
    x = _input(dim, 128)
    before = _smaps_mb()
    held = []
    for _ in range(2):
        session, weights = _open(variant, work)
        if variant == "served":
            weights.wait_upgraded()
        session.run(None, {"x": x})
        held.append((session, weights))
    after = _smaps_mb()
    return {
        "rss_mb": after["Rss"],
        "pss_mb": after["Pss"],
        "pss_anon_mb": after["Pss_Anon"],
        "pss_file_mb": after["Pss_File"],
        "base_pss_mb": before["Pss"],
    }


def child_throughput(work: Path, dim: int, seconds: float) -> dict[str, dict[str, float]]:
    sessions = {v: _open(v, work) for v in VARIANTS}
    sessions["served"][1].wait_upgraded()  # steady state: after the background swap
    out: dict[str, dict[str, float]] = {}
    for seq in (16, 128):
        x = _input(dim, seq)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for session, _ in sessions.values():
            session.run(None, {"x": x})
        deadline = time.monotonic() + seconds * len(VARIANTS)
        while time.monotonic() < deadline or min(len(t) for t in times.values()) < 5:
            for v, (session, _) in sessions.items():
                started = time.perf_counter()
                session.run(None, {"x": x})
                times[v].append(time.perf_counter() - started)
        out[str(seq)] = {v: statistics.median(t) for v, t in times.items()}
    return out


def child_api(work: Path) -> dict[str, dict[str, float]]:
    """Pre-packing off, so that only the hand-over itself could copy. Each API in turn, in this
    process: anonymous memory added by session creation = copies onnxruntime made."""
    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    refs = external_refs(model)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    data = work / "model.onnx.data"
    with open(data, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for api in ("add_initializer", "add_external_initializers", "files_in_memory"):
        gc.collect()
        anon = _status_mb("RssAnon")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(work)
        )
        arrays = [
            np.frombuffer(mapped, np.float32, r.length // 4, r.offset).reshape(dims[r.name])
            for r in refs
        ]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        started = time.perf_counter()
        if api == "add_initializer":
            for r, v in zip(refs, values, strict=True):
                options.add_initializer(r.name, v)
        elif api == "add_external_initializers":
            options.add_external_initializers([r.name for r in refs], values)
        else:
            options.add_session_config_entry(
                "session.use_external_initializer_file_buffers_directly", "1"
            )
            options.add_external_initializers_from_files_in_memory(
                [data.name], [memoryview(mapped)], [len(mapped)]
            )
        session = ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
        out[api] = {
            "ready_s": time.perf_counter() - started,
            "anon_added_mb": _status_mb("RssAnon") - anon,
        }
        del session, values, arrays, options
    return out


# --- orchestration ------------------------------------------------------------------------------


def _child(args: list[str]) -> Any:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per variant per seq length")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/load"))
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        return _run_child(args.child)

    work = args.workdir / f"{args.size_gb:g}gb-d{args.dim}"
    stamp = work / "weight_bytes"
    if not stamp.exists():
        started = time.monotonic()
        weight_bytes = generate(work / "model.onnx", int(args.size_gb * 2**30), args.dim)
        stamp.write_text(str(weight_bytes))
        print(f"generated {weight_bytes / 2**30:.2f} GiB in {time.monotonic() - started:.1f} s")
        report = pack_model(work / "model.onnx", work / "packed")
        print(report.summary())
    weight_bytes = int(stamp.read_text())
    weight_mb = weight_bytes / 2**20
    dim = str(args.dim)
    results: dict[str, Any] = {
        "weight_mb": weight_mb,
        "load": {v: [] for v in VARIANTS},
        "two": {v: [] for v in VARIANTS},
        "throughput": [],
        "cold": {},
    }
    for r in range(args.repeats):
        shift = r % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]  # rotate: drift hits every variant
        for v in order:
            results["load"][v].append(_child(["load", str(work), v, "willneed", dim]))
        for v in order:
            results["two"][v].append(_child(["two", str(work), v, dim]))
        results["throughput"].append(_child(["throughput", str(work), dim, str(args.seconds)]))
    results["api"] = _child(["api", str(work)])
    if args.no_cold:
        results["cold"] = "skipped (--no-cold)"
    elif _drop_caches():
        cold_variants = [
            ("plain", "none"),
            ("mapped", "none"),
            ("mapped", "willneed"),
            ("mapped", "read"),
            ("mapped-noprepack", "none"),
            ("mapped-noprepack", "willneed"),
            ("mapped-noprepack", "read"),
        ]
        for _ in range(args.repeats):
            for v, prefetch in cold_variants:
                _drop_caches()
                results["cold"].setdefault(f"{v}/{prefetch}", []).append(
                    _child(["load", str(work), v, prefetch, dim])
                )
    else:
        results["cold"] = "not measured: dropping the page cache is not allowed here"
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(_report(results, args))
    return 0


def _run_child(argv: list[str]) -> int:
    kind, work = argv[0], Path(argv[1])
    if kind == "load":
        result: Any = child_load(work, argv[2], argv[3], int(argv[4]))
    elif kind == "two":
        result = child_two(work, argv[2], int(argv[3]))
    elif kind == "throughput":
        result = child_throughput(work, int(argv[2]), float(argv[3]))
    else:
        result = child_api(work)
    print(json.dumps(result))
    return 0


def _report(res: dict[str, Any], args: argparse.Namespace) -> str:
    w = res["weight_mb"]
    load, two = res["load"], res["two"]
    plain_ready = _med(load["plain"], "ready_s")
    lines = [
        f"weights: {w:.0f} MiB; medians of {args.repeats} runs (warm page cache)",
        "",
        "| variant | READY s | vs plain | full speed s | peak RSS at READY "
        "| peak RSS after 1st inference | private (anon) MiB after 1st | 1st inference s "
        "| 2 instances PSS | 2 inst. PSS / weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        ready = _med(load[v], "ready_s")
        lines.append(
            f"| {v} | {ready:.3f} | {ready / plain_ready:.2f}x | {_med(load[v], 'upgraded_s'):.3f} "
            f"| {_med(load[v], 'peak_ready_mb') / w:.2f}x ({_med(load[v], 'peak_ready_mb'):.0f}) "
            f"| {_med(load[v], 'peak_first_mb') / w:.2f}x ({_med(load[v], 'peak_first_mb'):.0f}) "
            f"| {_med(load[v], 'anon_first_mb'):.0f} | {_med(load[v], 'first_s'):.3f} "
            f"| {_med(two[v], 'pss_mb'):.0f} | {_med(two[v], 'pss_mb') / w:.2f}x |"
        )
    lines += [
        "",
        "Steady state (latency per run, interleaved; throughput vs plain):",
        "",
        "| seq | plain ms | mapped ms | mapped / plain thr. | noprepack ms "
        "| noprepack / plain | served ms | served / plain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seq in ("16", "128"):
        rows = [t[seq] for t in res["throughput"]]
        p = statistics.median(r["plain"] for r in rows)
        m = statistics.median(r["mapped"] for r in rows)
        n = statistics.median(r["mapped-noprepack"] for r in rows)
        srv = statistics.median(r["served"] for r in rows)
        per_run = ", ".join(f"{r['plain'] / r['mapped']:.2f}" for r in rows)
        lines.append(
            f"| {seq} | {p * 1e3:.1f} | {m * 1e3:.1f} | {p / m:.2f}x ({per_run}) "
            f"| {n * 1e3:.1f} | {p / n:.2f}x | {srv * 1e3:.1f} | {p / srv:.2f}x |"
        )
    lines += [
        "",
        "OrtValues over a mapping (pre-packing off): anonymous memory added",
        "",
        "| API | READY s | copied MiB |",
        "|---|---:|---:|",
    ]
    for api, r in res["api"].items():
        lines.append(f"| {api} | {r['ready_s']:.3f} | {r['anon_added_mb']:.0f} |")
    if isinstance(res["cold"], str):
        lines += ["", f"Cold page cache: {res['cold']}."]
    else:
        lines += [
            "",
            "Cold page cache (`echo 1 > /proc/sys/vm/drop_caches` before each run):",
            "",
            "| variant/prefetch | READY s | 1st inference s | READY + 1st s |",
            "|---|---:|---:|---:|",
        ]
        for key, rows in res["cold"].items():
            ready, first = _med(rows, "ready_s"), _med(rows, "first_s")
            lines.append(
                f"| {key} | {ready:.3f} | {first:.3f} | "
                f"{statistics.median(r['ready_s'] + r['first_s'] for r in rows):.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
