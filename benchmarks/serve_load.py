"""Load test of `aiayn serve` on 127.0.0.1: closed-loop clients, each sending one Multi30k sentence
at a time, against the offline throughput of `aiayn.translate` on the same sentences.

    python benchmarks/serve_load.py                          # 1, 8, 32, 64 clients; 10 s each; beams 1 and 4
    python benchmarks/serve_load.py --duration 30 --cpus 1   # the server pinned to core 1 (taskset)
    python benchmarks/serve_load.py --quick                  # seconds: checks that it works

For each beam size and number of clients: requests/s, p50/p99 latency, errors and 503s, and the
server's resident memory (VmRSS at the end of the level, VmHWM = peak since start). The offline
figure is `translate()` over the same sentences in one process pinned like the server (one call,
its own length-sorted batches). Then an overload run: a server with a small queue (--max-queue) and
many clients must answer 503s at once instead of queueing without bound.
The load generator (asyncio, a keep-alive connection per client) runs on the CPUs given by
--client-cpus: on one shared core its own work counts against the server's; its own CPU ms per
request is printed too (near 1000 / req/s, it is what limits the level). On a busy machine, compare
CPU time rather than wall time: the server's CPU ms per request (all its threads, from /proc)
against offline CPU ms per sentence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentences(n: int) -> list[str]:
    from aiayn.data.corpus import multi30k

    return [src for src, _ in multi30k("test_2016_flickr", "en", "de")][:n]


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads: on a shared, busy core, the fair measure
    of the work a request costs (wall time also counts the other processes' turns)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, cpus: str | None, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aiayn.cli", "serve", "--port", str(port), "--no-lm", "--log-level", "warning",
           *extra]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(len(cpus.split(","))) if cpus else
           os.environ.get("OMP_NUM_THREADS", "")}
    proc = subprocess.Popen(cmd, env={k: v for k, v in env.items() if v}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit("the server exited")
    proc.kill()
    raise SystemExit("the server did not start")


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: requests written and responses read
    on asyncio's streams. httpx's client spent more CPU a request than the server does at 64 clients
    (its pool looks through its connections at each request), and the generator has one core."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await self.reader.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        content = await self.reader.readexactly(length)
        if close:
            self.close()
        return int(status.split()[1]), content

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, texts: list[str], clients: int, seconds: float, beam: int) -> dict:
    latencies, status = [], {}
    next_text = iter(range(10**9))
    deadline = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").rsplit(":", 1)

    async def client():
        http = Connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                text = texts[next(next_text) % len(texts)]
                t0 = time.perf_counter()
                try:
                    code = (await http.post("/v1/translate", {"text": text, "beam": beam}))[0]
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    code = "error"
                    http.close()
                status[code] = status.get(code, 0) + 1
                if code == 200:
                    latencies.append(time.perf_counter() - t0)
                elif code == 503:
                    await asyncio.sleep(0.05)
        finally:
            http.close()

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed, client_cpu = time.perf_counter() - t0, time.process_time() - c0
    latencies.sort()

    def pct(p):
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None
    return {"clients": clients, "beam": beam, "ok": len(latencies), "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "client_cpu_ms": round(1000 * client_cpu / max(1, len(latencies)), 2),
            "status": {str(k): v for k, v in sorted(status.items(), key=str)}}


def offline(texts: list[str], beam: int, cpus: str | None) -> tuple[float, float]:
    """(sentences/s, CPU seconds per sentence) of translate() over `texts`, in a fresh process
    pinned like the server."""
    code = f"""
import json, sys, time
from aiayn.checkpoint import load_model_dir
from aiayn.data.corpus import ASSETS
from aiayn.translate import translate
model, tok, _, extra = load_model_dir(ASSETS / "models" / "en-de")
texts = json.loads(sys.stdin.read())
translate(model, tok, texts[:8], beam={beam})  # the inference copy and the kernels, before timing
t0, c0 = time.perf_counter(), time.process_time()
translate(model, tok, texts, beam={beam}, alpha=float(extra.get("alpha", 0.6)))
print(len(texts) / (time.perf_counter() - t0), (time.process_time() - c0) / len(texts))
"""
    cmd = [sys.executable, "-c", code]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cpus:
        env["OMP_NUM_THREADS"] = str(len(cpus.split(",")))
    out = subprocess.run(cmd, input=json.dumps(texts), capture_output=True, text=True, env=env, check=True)
    per_s, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(per_s), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    ap.add_argument("--sentences", type=int, default=1000, help="Multi30k test sentences used (default 1000)")
    ap.add_argument("--cpus", help="pin the server (and the offline run) to these CPUs, e.g. 1")
    ap.add_argument("--client-cpus", help="pin this load generator to these CPUs")
    ap.add_argument("--overload-clients", type=int, default=128)
    ap.add_argument("--overload-queue", type=int, default=16)
    ap.add_argument("--soak", type=float, default=0, help="then this many seconds at 32 clients, greedy, "
                    "printing the server's VmRSS every 10 s")
    ap.add_argument("--quick", action="store_true", help="1 and 8 clients, 2 s, greedy: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.beams, args.duration, args.sentences, args.overload_clients = "1,8", "1", 2.0, 64, 32
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    texts = sentences(args.sentences)
    print(f"# {len(texts)} Multi30k test sentences; server CPUs: {args.cpus or 'all'}; "
          f"{args.duration:g} s per level", flush=True)
    rows = []
    port = free_port()
    server = start_server(port, args.cpus, [])
    try:
        url = f"http://127.0.0.1:{port}"
        for beam in (int(b) for b in args.beams.split(",")):
            base, base_cpu = offline(texts, beam, args.cpus)
            print(f"offline translate(), beam {beam}: {base:.1f} sentences/s, {1000 * base_cpu:.1f} CPU ms "
                  "per sentence", flush=True)
            for clients in (int(c) for c in args.clients.split(",")):
                c0, h0 = cpu_seconds(server.pid), httpx.get(f"{url}/healthz").json()
                row = asyncio.run(load(url, texts, clients, args.duration, beam))
                cpu = (cpu_seconds(server.pid) - c0) / max(1, row["ok"])
                h1 = httpx.get(f"{url}/healthz").json()
                row["mean_batch"] = round((h1["batched_sentences"] - h0["batched_sentences"]) /
                                          max(1, h1["batches"] - h0["batches"]), 1)
                row.update(memory_kb(server.pid), offline_per_s=round(base, 1),
                           of_offline=round(row["req_per_s"] / base, 2), cpu_ms=round(1000 * cpu, 1),
                           offline_cpu_ms=round(1000 * base_cpu, 1), cpu_of_offline=round(base_cpu / cpu, 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.soak:
            for _ in range(max(1, int(args.soak // 10))):
                r = asyncio.run(load(url, texts, 32, 10, 1))
                print(json.dumps({"soak": True, "req_per_s": r["req_per_s"], "p99_ms": r["p99_ms"],
                                  **memory_kb(server.pid)}), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    port = free_port()
    server = start_server(port, args.cpus, ["--max-queue", str(args.overload_queue)])
    try:
        row = asyncio.run(load(f"http://127.0.0.1:{port}", texts, args.overload_clients, args.duration, 1))
        row.update(memory_kb(server.pid), overload_queue=args.overload_queue)
        print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    print("\n| beam | clients | req/s | of offline | p50 ms | p99 ms | mean batch | server CPU ms/req | "
          "offline CPU ms/sent. | CPU efficiency | client CPU ms/req | VmRSS MB | VmHWM MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['beam']} | {r['clients']} | {r['req_per_s']} | {r['of_offline']:.0%} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['mean_batch']} | {r['cpu_ms']} | {r['offline_cpu_ms']} | {r['cpu_of_offline']:.0%} | "
              f"{r['client_cpu_ms']} | "
              f"{r['VmRSS'] / 1024:.0f} | {r['VmHWM'] / 1024:.0f} |")
    print(f"\noverload: {args.overload_clients} clients, queue {args.overload_queue}: {row['status']} "
          f"(200 p99 {row['p99_ms']} ms)")


if __name__ == "__main__":
    main()
