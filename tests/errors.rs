//! Bad input that gets past option parsing: garbage, truncated or oversized kernels and initramfs, an overlong
//! command line, and /dev/kvm missing or not permitted. Each ends with one `atrium: ...` line and exit code 1.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Asserts a setup failure: exit 1, a single stderr line starting with `atrium: ` that contains every `needle`.
fn assert_setup_error(run: &Run, needles: &[&str]) {
    assert_eq!(run.code(), 1, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {run:?}");
    assert!(lines[0].starts_with("atrium: "), "{run:?}");
    for n in needles {
        assert!(lines[0].contains(n), "'{n}' missing in: {}", lines[0]);
    }
    assert!(!run.stderr.contains("panicked"), "{run:?}");
}

fn write_file(name: &str, bytes: &[u8]) -> String {
    let dir = scratch_dir(name);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn garbage_kernel() {
    if !kvm_available() {
        return;
    }
    let bytes: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let kernel = write_file("garbage-kernel", &bytes);
    let run = run_atrium(&["--kernel", &kernel], GUEST_LIMIT);
    assert_setup_error(&run, &["garbage-kernel", "not a kernel Atrium can boot"]);
}

#[test]
fn empty_kernel() {
    if !kvm_available() {
        return;
    }
    let kernel = write_file("empty-kernel", &[]);
    let run = run_atrium(&["--kernel", &kernel], GUEST_LIMIT);
    assert_setup_error(&run, &["empty-kernel", "not a kernel Atrium can boot"]);
}

#[test]
fn truncated_bzimage() {
    if !kvm_available() {
        return;
    }
    let full = std::fs::read(guests::path("report.bzImage")).unwrap();
    let kernel = write_file("truncated-bzimage", &full[..0x300]);
    let run = run_atrium(&["--kernel", &kernel], GUEST_LIMIT);
    assert_setup_error(&run, &["truncated-bzimage", "cannot load the kernel"]);
}

#[test]
fn truncated_elf() {
    if !kvm_available() {
        return;
    }
    let full = std::fs::read(guests::path("report.elf")).unwrap();
    let kernel = write_file("truncated-elf", &full[..100]);
    let run = run_atrium(&["--kernel", &kernel], GUEST_LIMIT);
    assert_setup_error(&run, &["truncated-elf", "cannot load the kernel"]);
}

#[test]
fn kernel_larger_than_guest_memory() {
    if !kvm_available() {
        return;
    }
    let mut bytes = std::fs::read(guests::path("report.bzImage")).unwrap();
    bytes.resize(20 << 20, 0);
    let kernel = write_file("huge-kernel", &bytes);
    let run = run_atrium(&["--kernel", &kernel, "--memory", "size=16M"], GUEST_LIMIT);
    assert_setup_error(&run, &["does not fit in guest memory", "--memory"]);
}

#[test]
fn initramfs_larger_than_guest_memory() {
    if !kvm_available() {
        return;
    }
    let initrd = write_file("huge-initrd", &vec![0u8; 24 << 20]);
    let kernel = guest("report.bzImage");
    let run = run_atrium(
        &[
            "--kernel",
            &kernel,
            "--initramfs",
            &initrd,
            "--memory",
            "size=16M",
        ],
        GUEST_LIMIT,
    );
    assert_setup_error(&run, &["initramfs", "do not fit in guest memory"]);
}

#[test]
fn cmdline_longer_than_the_kernel_allows() {
    if !kvm_available() {
        return;
    }
    let long = "a".repeat(70_000);
    let kernel = guest("report.elf");
    let run = run_atrium(&["--kernel", &kernel, "--cmdline", &long], GUEST_LIMIT);
    assert_setup_error(&run, &["command line is 70000 bytes", "at most"]);
}

#[test]
fn cmdline_longer_than_the_bzimage_header_allows() {
    if !kvm_available() {
        return;
    }
    let long = "b".repeat(10_000);
    let kernel = guest("report.bzImage");
    let run = run_atrium(&["--kernel", &kernel, "--cmdline", &long], GUEST_LIMIT);
    assert_setup_error(&run, &["command line is 10000 bytes", "at most"]);
}

/// Runs atrium through a shell wrapper (unshare/setpriv from util-linux) and returns the run, or None if the wrapper
/// is unavailable here.
fn wrapped(wrapper: &str) -> Option<Run> {
    let bin = env!("CARGO_BIN_EXE_atrium");
    let probe = Command::new("sh")
        .args(["-c", &format!("command -v {}", wrapper.split(' ').next()?)])
        .output()
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    let child = Command::new("sh")
        .args(["-c", &format!("{wrapper} {bin}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    Some(wait_bounded(child, GUEST_LIMIT))
}

#[test]
fn missing_dev_kvm_says_how_to_fix_it() {
    // A private mount namespace with an empty /dev hides /dev/kvm from atrium only.
    let Some(run) = wrapped("unshare --mount sh -c 'mount -t tmpfs none /dev && exec \"$0\"'")
    else {
        eprintln!("SKIPPED: unshare not available");
        return;
    };
    if run.stderr.contains("unshare:") || run.stderr.contains("mount:") {
        eprintln!(
            "SKIPPED: cannot create a mount namespace here: {}",
            run.stderr
        );
        return;
    }
    assert_setup_error(&run, &["/dev/kvm does not exist", "load the kvm module"]);
}

#[test]
fn unpermitted_dev_kvm_says_how_to_fix_it() {
    // /dev/kvm is root-only on this host; an unprivileged uid cannot open it.
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if !matches!(mode, Ok(m) if m & 0o006 == 0) {
        eprintln!("SKIPPED: /dev/kvm is open to other users here");
        return;
    }
    let Some(run) = wrapped("setpriv --reuid=65534 --regid=65534 --clear-groups") else {
        eprintln!("SKIPPED: setpriv not available");
        return;
    };
    assert_setup_error(&run, &["permission denied opening /dev/kvm", "kvm"]);
}
