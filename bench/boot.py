#!/usr/bin/env python3
"""Boot benchmark for Atrium; prints JSON.

Measures, with a release build of `atrium`:
  - boot_to_exit_ms: process start to exit for the built-in demo guest (median/min/max of N runs)
  - cpu_ms_per_boot: user+system CPU time of one such run (median)
  - peak_rss_kib: peak resident set of the VMM process (median of 5 runs, through /usr/bin/time)
  - idle_pss_kib: proportional set size of a VMM whose 128 MiB guest sits halted
  - parallel_8_ms: wall time for 8 VMs started at once until all have exited

Usage: bench/boot.py [--atrium PATH] [--runs N] [--out FILE]
"""
import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import time


def run_once(cmd):
    # posix_spawn (vfork-based) keeps this Python process's memory out of the child's peak-RSS accounting.
    devnull = os.open(os.devnull, os.O_RDWR)
    start = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[
        (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2),
    ])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    os.close(devnull)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} exited with {code}")
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3


def peak_rss_kib(cmd):
    """Peak RSS of one run, measured through GNU time: a small C parent, so the exec'ing child's old address space
    (which the kernel folds into ru_maxrss) is tiny rather than this Python process."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"atrium-bench-{os.getpid()}.rss")
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out, *cmd], stdout=subprocess.DEVNULL, check=True)
    with open(out) as f:
        value = int(f.read().split()[-1])
    os.remove(out)
    return value


def summary(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def idle_pss(atrium, guest):
    proc = subprocess.Popen(
        [atrium, "--kernel", guest, "--cmdline", "action=halt", "--memory", "size=128M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    seen = b""
    while b"atrium-guest: halting" not in seen:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            sys.exit("idle guest ended early")
        seen += chunk
    with open(f"/proc/{proc.pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    pss = int(fields["Pss"].split()[0])
    rss = int(fields["Rss"].split()[0])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return pss, rss


def parallel(atrium, count):
    start = time.perf_counter()
    procs = [subprocess.Popen([atrium], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) for _ in range(count)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"parallel boots failed: {codes}")
    return (time.perf_counter() - start) * 1e3


def main():
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--atrium", default=os.path.join(top, "target/release/atrium"))
    ap.add_argument("--guest", default=None, help="report guest (default: the release build's)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not os.path.exists(args.atrium):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=top, check=True)
    guest = args.guest
    if guest is None:
        built = glob.glob(os.path.join(top, "target/release/build/guests-*/out/report.bzImage"))
        if not built:
            sys.exit("no report guest built: run cargo build --release first")
        guest = max(built, key=os.path.getmtime)

    run_once([args.atrium])  # warm-up
    walls, cpus = [], []
    for _ in range(args.runs):
        wall, cpu = run_once([args.atrium])
        walls.append(wall)
        cpus.append(cpu)
    rsss = [peak_rss_kib([args.atrium]) for _ in range(5)] if os.path.exists("/usr/bin/time") else [float("nan")]
    pss, rss = idle_pss(args.atrium, guest)
    result = {
        "boot_to_exit_ms": summary(walls),
        "cpu_ms_per_boot": summary(cpus),
        "peak_rss_kib": summary(rsss),
        "idle_128m_guest": {"pss_kib": pss, "rss_kib": rss},
        "parallel_8_ms": round(parallel(args.atrium, 8), 3),
        "runs": args.runs,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
