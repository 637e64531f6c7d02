//! The real-kernel check of the boot path: Debian's cloud kernel (fetched by tests/scripts/fetch-kernel.sh, not
//! committed) boots far enough to print its banner, our command line, our e820 map and the CPU count from our ACPI
//! tables. On a host whose KVM emulates guest code it then stops at FPU setup; the test asserts on what comes before.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn kernel_path() -> Option<PathBuf> {
    let path = std::env::var_os("ATRIUM_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-assets/vmlinuz")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{} is missing: run tests/scripts/fetch-kernel.sh",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: no Linux kernel at {} (run tests/scripts/fetch-kernel.sh)",
        path.display()
    );
    None
}

/// Everything the kernel must have printed before the test is satisfied.
const MARKERS: &[&str] = &[
    "Linux version ",
    "Command line: ",
    "BIOS-provided physical RAM map:",
    "smpboot: Allowing 2 CPUs",
];

#[test]
fn debian_kernel_prints_banner_cmdline_e820_and_cpu_count() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = kernel_path() else { return };
    let cmdline = "earlyprintk=serial console=ttyS0 atrium.test=linux-boot";
    let mut child = atrium()
        .args([
            "--kernel",
            &kernel.display().to_string(),
            "--cmdline",
            cmdline,
        ])
        .args(["--cpus", "boot=2", "--memory", "size=512M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut serial = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    // A safety bound on the kernel's slow emulated boot, not a speed assertion.
    let limit = Duration::from_secs(400);
    loop {
        let text = String::from_utf8_lossy(&serial);
        if MARKERS.iter().all(|m| text.contains(m)) || start.elapsed() > limit {
            break;
        }
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => serial.extend_from_slice(&buf[..n]),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&serial).replace('\r', "");
    for m in MARKERS {
        assert!(text.contains(m), "kernel output lacks '{m}':\n{text}");
    }
    let banner = text.lines().find(|l| l.contains("Linux version ")).unwrap();
    assert!(banner.contains("Debian"), "{banner}");
    let cmd = text
        .lines()
        .find_map(|l| l.split("Command line: ").nth(1))
        .unwrap();
    assert_eq!(cmd.trim_end(), cmdline);
    // Our e820 map, as the kernel prints it (inclusive end addresses).
    for range in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ] {
        assert!(text.contains(range), "missing e820 line '{range}':\n{text}");
    }
    assert!(
        text.contains("ACPI: RSDP 0x00000000000E0000"),
        "ACPI RSDP not found:\n{text}"
    );
}
