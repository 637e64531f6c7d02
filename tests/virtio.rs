//! Virtio devices on PCI, end to end on /dev/kvm: the in-tree guest enumerates PCI, drives virtio-pci devices with
//! MSI-X, and the test checks what landed on the host (raw bytes, `qemu-img check` for qcow2).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const SECTOR: usize = 512;

/// The guest's pattern for device `dev`: sectors 1..=8, byte i = (i * 7 + 13 + 31 * dev) & 0xff.
fn pattern(dev: usize) -> Vec<u8> {
    (0..4096)
        .map(|i| ((i * 7 + 13 + 31 * dev) & 0xff) as u8)
        .collect()
}

fn run_guest(actions: &str, extra: &[&str]) -> Run {
    let kernel = guest("report.bzImage");
    let cmdline = format!("action={actions}");
    let mut args = vec!["--kernel", kernel.as_str(), "--cmdline", cmdline.as_str()];
    args.extend_from_slice(extra);
    let run = run_atrium(&args, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    run
}

fn raw_disk(dir: &Path, name: &str, size: usize, sector0: &[u8]) -> String {
    let path = dir.join(name);
    let mut bytes = vec![0u8; size];
    bytes[..sector0.len()].copy_from_slice(sector0);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn pci_scan_finds_host_bridge_and_virtio_functions() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-scan");
    let disk = raw_disk(&dir, "d.raw", 1 << 20, b"");
    let spec = format!("path={disk}");
    let run = run_guest("pci-scan", &["--disk", &spec, "--rng"]);
    let lines = run.lines("pci: 00:");
    assert!(
        lines[0].starts_with("00.0 8086:0d57 class=06.00"),
        "{}",
        run.serial
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" 1af4:1042 class=01.80 bars=0x")),
        "{}",
        run.serial
    );
    assert!(
        lines.iter().any(|l| l.contains(" 1af4:1044 ")),
        "{}",
        run.serial
    );
    assert_eq!(run.line("pci: count="), "3");
}

#[test]
fn virtio_blk_writes_reach_raw_images_and_reads_return_host_data() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-blk-raw");
    let a = raw_disk(&dir, "a.raw", 4 << 20, b"ATRIUM-DISK-A-S0");
    let b = raw_disk(&dir, "b.raw", 2 << 20, b"ATRIUM-DISK-B-S0");
    let spec_a = format!("path={a},serial=SERIAL-A");
    let spec_b = format!("path={b},serial=SERIAL-B,num_queues=2");
    let run = run_guest("virtio-blk", &["--disk", &spec_a, "--disk", &spec_b]);

    assert_eq!(
        run.line("blk: 0 capacity="),
        format!("{} serial=SERIAL-A", (4 << 20) / SECTOR)
    );
    assert_eq!(
        run.line("blk: 1 capacity="),
        format!("{} serial=SERIAL-B", (2 << 20) / SECTOR)
    );
    for dev in 0..2 {
        let rw = run.line(&format!("blk: {dev} write="));
        assert!(rw.starts_with("0 read=0 verify=ok irq="), "{rw}");
        let irqs: u32 = rw.rsplit('=').next().unwrap().parse().unwrap();
        assert!(irqs >= 1, "no MSI-X interrupt arrived: {rw}");
        assert_eq!(run.line(&format!("blk: {dev} flush=")), "0");
    }
    // What the guest read from sector 0 is what the host put there.
    assert_eq!(run.line("blk: 0 sector0="), hex(b"ATRIUM-DISK-A-S0"));
    assert_eq!(run.line("blk: 1 sector0="), hex(b"ATRIUM-DISK-B-S0"));
    // What the guest wrote is on the host, at sectors 1..=8, and nothing else changed.
    for (dev, path) in [(0, &a), (1, &b)] {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[SECTOR..SECTOR + 4096],
            pattern(dev).as_slice(),
            "disk {dev}"
        );
        assert!(
            bytes[SECTOR + 4096..].iter().all(|&b| b == 0),
            "disk {dev} written beyond the pattern"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn readonly_disks_refuse_writes_and_stay_unchanged() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-blk-ro");
    let a = raw_disk(&dir, "ro.raw", 1 << 20, b"READ-ONLY-SECTOR");
    let before = std::fs::read(&a).unwrap();
    let spec = format!("path={a},readonly=on");
    let run = run_guest("virtio-blk", &["--disk", &spec]);
    assert_eq!(run.lines("blk: 0 readonly").len(), 1, "{}", run.serial);
    assert!(
        run.line("blk: 0 write=").starts_with("1 refused=yes"),
        "{}",
        run.serial
    );
    assert_eq!(std::fs::read(&a).unwrap(), before);
}

fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(out) => Some(out),
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("qemu-img is required under CI")
        }
        Err(_) => {
            eprintln!("SKIPPED: qemu-img not installed");
            None
        }
    }
}

#[test]
fn virtio_blk_on_qcow2_is_clean_under_qemu_img_check() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-blk-qcow2");
    let img = dir.join("disk.qcow2").display().to_string();
    let Some(out) = qemu_img(&["create", "-q", "-f", "qcow2", &img, "16M"]) else {
        return;
    };
    assert!(out.status.success(), "{out:?}");
    let spec = format!("path={img},serial=QCOW");
    let run = run_guest("virtio-blk", &["--disk", &spec]);
    assert!(
        run.line("blk: 0 write=").starts_with("0 read=0 verify=ok"),
        "{}",
        run.serial
    );
    // An unwritten qcow2 cluster reads as zeroes.
    assert_eq!(run.line("blk: 0 sector0="), "0".repeat(32));

    let check = qemu_img(&["check", &img]).unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = dir.join("converted.raw").display().to_string();
    let conv = qemu_img(&["convert", "-O", "raw", &img, &raw]).unwrap();
    assert!(conv.status.success(), "{conv:?}");
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(&bytes[SECTOR..SECTOR + 4096], pattern(0).as_slice());
}

#[test]
fn a_second_vm_cannot_open_a_disk_in_use() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-blk-lock");
    let a = raw_disk(&dir, "locked.raw", 1 << 20, b"");
    let spec = format!("path={a}");
    let kernel = guest("report.bzImage");
    let mut holder = atrium()
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "action=halt",
            "--disk",
            &spec,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first VM runs (its disk is open and locked by then).
    let mut out = holder.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, "atrium-guest: halting");
    let second = run_atrium(&["--kernel", &kernel, "--disk", &spec], GUEST_LIMIT);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) };
    holder.stdout = Some(out);
    let first = wait_bounded(holder, GUEST_LIMIT);
    assert_eq!(first.code(), 0, "{first:?}");
    assert_eq!(second.code(), 1, "{second:?}");
    let line = second.stderr.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("atrium: --disk path="),
        "{}",
        second.stderr
    );
    assert!(line.contains("lock"), "{}", second.stderr);
}

#[test]
fn virtio_rng_returns_bytes() {
    if !kvm_available() {
        return;
    }
    let run = run_guest("virtio-rng", &["--rng"]);
    let line = run.line("rng: bytes=");
    assert!(line.starts_with("64 nonzero="), "{line}");
    let nonzero: u32 = line
        .split("nonzero=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        nonzero > 32,
        "64 random bytes with only {nonzero} non-zero: {line}"
    );
}

#[test]
fn malformed_requests_get_errors_and_the_device_recovers() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-bad");
    let a = raw_disk(&dir, "bad.raw", 1 << 20, b"RECOVERY-SECTOR0");
    let spec = format!("path={a}");
    let run = run_guest("virtio-bad=all,virtio-blk", &["--disk", &spec]);
    // Chains the device cannot answer are returned unused (length 0) or the device asks for a reset.
    for kind in ["loop", "toolong", "nostatus", "rostatus"] {
        let line = run.line(&format!("bad: {kind} "));
        assert!(
            line.starts_with("used_len=0 status=none") || line.contains("device_status=0x4"),
            "{kind}: {line}"
        );
    }
    let badtype = run.line("bad: badtype ");
    assert!(
        badtype.contains("status=2"),
        "unknown request types are UNSUPP: {badtype}"
    );
    let oob = run.line("bad: oob ");
    assert!(
        oob.contains("status=1") || oob.contains("device_status=0x4"),
        "{oob}"
    );
    assert_eq!(run.line("bad: recovered="), "ok");
    // The VM kept running: the later virtio-blk action worked too.
    assert!(
        run.line("blk: 0 write=").starts_with("0 read=0 verify=ok"),
        "{}",
        run.serial
    );
}

#[test]
fn qcow2_overlay_reads_its_backing_file_and_writes_only_the_overlay() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-blk-backing");
    let base = raw_disk(&dir, "base.raw", 8 << 20, b"BACKING-FILE-S0!");
    let base_before = std::fs::read(&base).unwrap();
    let overlay = dir.join("overlay.qcow2").display().to_string();
    let Some(out) = qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &overlay,
    ]) else {
        return;
    };
    assert!(out.status.success(), "{out:?}");

    // Without format=qcow2 the format is detected, and a detected image may not open host files: refused.
    let kernel = guest("report.bzImage");
    let probed = run_atrium(
        &["--kernel", &kernel, "--disk", &format!("path={overlay}")],
        GUEST_LIMIT,
    );
    assert_eq!(probed.code(), 1, "{probed:?}");
    assert!(probed.stderr.contains("format=qcow2"), "{}", probed.stderr);

    let spec = format!("path={overlay},format=qcow2");
    let run = run_guest("virtio-blk", &["--disk", &spec]);
    assert_eq!(
        run.line("blk: 0 sector0="),
        hex(b"BACKING-FILE-S0!"),
        "read through to the backing file"
    );
    assert!(
        run.line("blk: 0 write=").starts_with("0 read=0 verify=ok"),
        "{}",
        run.serial
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the backing file was written"
    );
    let check = qemu_img(&["check", &overlay]).unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = dir.join("flat.raw").display().to_string();
    let conv = qemu_img(&["convert", "-O", "raw", &overlay, &raw]).unwrap();
    assert!(conv.status.success(), "{conv:?}");
    let flat = std::fs::read(&raw).unwrap();
    assert_eq!(&flat[..16], b"BACKING-FILE-S0!");
    assert_eq!(&flat[SECTOR..SECTOR + 4096], pattern(0).as_slice());
}
