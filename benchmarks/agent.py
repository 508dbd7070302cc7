"""Node agent overhead: CPU share of one core and resident memory, 8 simulated GPUs plus host.

The agent runs as its own process (``stethoscope agent --simulate-gpus 8``) sending to a
real ``stethoscope up`` with its spool on; psutil samples the agent process from the
outside. Measured at the base interval and at the fast interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from stethoscope._net import free_port


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def measure(interval: str, seconds: float, workdir: Path, otlp: int) -> dict:
    cmd = [sys.executable, "-m", "stethoscope", "agent", "--endpoint", f"http://127.0.0.1:{otlp}",
           "--collectors", "host,simulate", "--simulate-gpus", "8", "--interval", interval,
           "--fast-interval", interval, "--spool-dir", str(workdir / f"spool-{interval}"),
           "--prometheus-port", "0", "--log-level", "WARNING"]
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p = psutil.Process(agent.pid)
        time.sleep(5)  # past start-up: imports and the first collection
        c0, t0 = p.cpu_times(), time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(p.memory_info().rss)
            time.sleep(0.5)
        c1, t1 = p.cpu_times(), time.monotonic()
    finally:
        agent.terminate()
        agent.wait(60)
    cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
    return {"interval": interval, "seconds": round(t1 - t0, 1), "cpu_share_of_one_core": cpu,
            "rss_max_mib": max(rss) / 2**20, "rss_median_mib": sorted(rss)[len(rss) // 2] / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window per interval (default 60)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="stethoscope-agent-bench-"))
    otlp, sql = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "stethoscope", "up", "--data-dir", str(workdir / "data"),
                           "--otlp-http-port", str(otlp), "--sql-port", str(sql), "--log-level", "WARNING"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(f"http://127.0.0.1:{otlp}/healthz", up)
        rows = [measure("10s", args.seconds, workdir, otlp), measure("1s", args.seconds, workdir, otlp)]
    finally:
        up.terminate()
        up.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    print("| interval | CPU, share of one core | RSS max (MiB) | RSS median (MiB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['interval']} | {r['cpu_share_of_one_core']:.4f} ({r['cpu_share_of_one_core'] * 100:.2f}%) | "
              f"{r['rss_max_mib']:.1f} | {r['rss_median_mib']:.1f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
