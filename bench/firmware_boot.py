#!/usr/bin/env python3
"""Firmware boot benchmark for Atrium; prints JSON.

Measures the wall time from process start until Debian's SeaBIOS has booted the in-tree boot-sector disk (disk A)
from virtio-blk and the disk has powered the machine off, with a release build of `atrium`, next to the same boot
under QEMU (`-M pc,acpi=off` with an isa-debug-exit device at 0x600, so the disk's power-off write ends QEMU too).
On a host whose KVM emulates guest kernel code (PVM), this is dominated by the emulator.

Usage: bench/firmware_boot.py [--atrium PATH] [--disk PATH] [--runs N] [--out FILE]
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

SEABIOS = "/usr/share/seabios/bios-256k.bin"


def timed(cmd, ok_codes):
    start = time.perf_counter()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300)
    wall = (time.perf_counter() - start) * 1e3
    if done.returncode not in ok_codes or b"atrium-boot: done" not in done.stdout:
        sys.exit(f"{' '.join(cmd)} exited with {done.returncode}: {done.stdout[-400:]!r} {done.stderr[-400:]!r}")
    return wall


def summary(samples):
    return {"median_ms": round(statistics.median(samples), 1), "min_ms": round(min(samples), 1),
            "max_ms": round(max(samples), 1), "runs": len(samples)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--atrium", default="target/release/atrium")
    parser.add_argument("--disk", default=None, help="boot-a.img (default: the one the guests build produced)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()

    disk = args.disk
    if disk is None:
        found = sorted(glob.glob("target/*/build/guests-*/out/boot-a.img"), key=os.path.getmtime)
        if not found:
            sys.exit("no boot-a.img: run `cargo build --release` first")
        disk = found[-1]

    result = {"disk": disk, "firmware": SEABIOS}
    atrium = [args.atrium, "--firmware", SEABIOS, "--disk", f"path={disk},readonly=on"]
    result["atrium_seabios_boot_sector_poweroff"] = summary([timed(atrium, {0}) for _ in range(args.runs)])

    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        cmd = [qemu, "-accel", "kvm", "-M", "pc,acpi=off,graphics=off", "-nodefaults", "-display", "none",
               "-serial", "stdio", "-m", "512", "-bios", SEABIOS,
               "-drive", f"file={disk},if=none,id=d,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=d",
               "-device", "isa-debug-exit,iobase=0x600,iosize=1"]
        # isa-debug-exit turns the 0x34 written to 0x600 into exit status (0x34 << 1) | 1.
        result["qemu_seabios_boot_sector_poweroff"] = summary([timed(cmd, {0x69}) for _ in range(args.runs)])

    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
