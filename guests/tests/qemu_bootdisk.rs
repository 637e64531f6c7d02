//! The boot-sector test disks under QEMU with SeaBIOS (i440fx machine, KVM, virtio-blk disks).
//!
//! SeaBIOS sends INT 10h teletype output to COM1 (QEMU's stdout) because `graphics=off` makes QEMU set fw_cfg
//! `etc/sercon-port`. The machine runs without ACPI: otherwise SeaBIOS puts the PIIX4 power-management registers
//! at port 0x600, where Atrium has its ACPI sleep control register. With the port free, an `isa-debug-exit`
//! device there turns the disk's power-off write (`0x34`) into QEMU's exit status `(0x34 << 1) | 1`, so the tests
//! check the exact write Atrium powers off on.
//!
//! The tests are skipped, loudly, when `qemu-system-x86_64`, SeaBIOS or `/dev/kvm` is missing; under CI
//! (`CI=true`) that is a failure.

use guests::{BootDisk, BOOT_DONE_LINE};
use std::path::Path;
use std::process::{Command, Stdio};

const QEMU: &str = "qemu-system-x86_64";
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// QEMU's exit status when the guest writes 0x34 (SLP_EN | SLP_TYP=5) to the debug-exit device at 0x600.
const POWERED_OFF: i32 = (0x34 << 1) | 1;
/// Upper bound on one run in seconds; a boot normally takes a few.
const RUN_LIMIT_SECONDS: u64 = 120;
/// `timeout`'s exit status when the limit was reached.
const TIMED_OUT: i32 = 124;

fn available() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let seabios = Path::new(SEABIOS).is_file();
    if kvm && qemu && seabios {
        return true;
    }
    let missing = format!(
        "needs {QEMU} and {SEABIOS} (apt-get install qemu-system-x86 seabios) and /dev/kvm \
         (kvm={kvm} qemu={qemu} seabios={seabios})"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{missing}");
    }
    eprintln!("SKIPPED: {missing}");
    false
}

struct Run {
    code: Option<i32>,
    serial: String,
}

impl Run {
    /// The disk's lines: whatever follows `atrium-boot: ` on a line (the serial console may put terminal
    /// control sequences before it).
    fn boot_lines(&self) -> Vec<&str> {
        self.serial
            .lines()
            .filter_map(|l| l.find("atrium-boot: ").map(|at| l[at..].trim_end()))
            .collect()
    }

    fn has(&self, line: &str) -> bool {
        self.serial.lines().any(|l| l.trim_end() == line)
    }
}

/// Boots SeaBIOS with `disks` (read-only virtio-blk devices, each with an optional `bootindex`). A reset ends
/// QEMU (`-no-reboot`), and SeaBIOS resets right away when nothing boots (`reboot-timeout=0`).
fn boot(disks: &[(BootDisk, Option<u32>)]) -> Run {
    let mut command = Command::new("timeout");
    command
        .arg(RUN_LIMIT_SECONDS.to_string())
        .arg(QEMU)
        .args([
            "-accel",
            "kvm",
            "-M",
            "pc,acpi=off,graphics=off",
            "-m",
            "128",
        ])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-bios", SEABIOS])
        .args(["-boot", "reboot-timeout=0"])
        .args(["-device", "isa-debug-exit,iobase=0x600,iosize=1"]);
    for (i, (disk, bootindex)) in disks.iter().enumerate() {
        let drive = format!(
            "file={},if=none,id=d{i},format=raw,readonly=on",
            disk.path().display()
        );
        let mut device = format!("virtio-blk-pci,drive=d{i}");
        if let Some(index) = bootindex {
            device.push_str(&format!(",bootindex={index}"));
        }
        command.args(["-drive", &drive, "-device", &device]);
    }
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let run = Run {
        code: output.status.code(),
        serial: String::from_utf8_lossy(&output.stdout).into_owned(),
    };
    assert_ne!(
        run.code,
        Some(TIMED_OUT),
        "QEMU did not finish within {RUN_LIMIT_SECONDS} s:\n{}",
        run.serial
    );
    run
}

#[test]
fn each_bootable_disk_prints_its_lines_and_powers_off_through_port_0x600() {
    if !available() {
        return;
    }
    for disk in [BootDisk::A, BootDisk::B] {
        let run = boot(&[(disk, None)]);
        assert_eq!(run.boot_lines(), disk.boot_lines(), "{}", run.serial);
        // The whole last line arrived: the disk flushed SeaBIOS's serial console before powering off.
        assert!(run.has(BOOT_DONE_LINE), "{}", run.serial);
        assert_eq!(run.code, Some(POWERED_OFF), "{}", run.serial);
    }
}

#[test]
fn bootindex_decides_which_of_two_disks_boots() {
    if !available() {
        return;
    }
    for (first, second) in [(BootDisk::B, BootDisk::A), (BootDisk::A, BootDisk::B)] {
        // The disk with the lower bootindex is attached second, so PCI order alone would pick the other one.
        let run = boot(&[(second, Some(2)), (first, Some(1))]);
        assert_eq!(run.boot_lines(), first.boot_lines(), "{}", run.serial);
        assert_eq!(run.code, Some(POWERED_OFF), "{}", run.serial);
    }
}

#[test]
fn a_disk_without_the_boot_signature_is_not_booted() {
    if !available() {
        return;
    }
    let run = boot(&[(BootDisk::NonBootable, None)]);
    assert!(
        run.has("Boot failed: not a bootable disk"),
        "{}",
        run.serial
    );
    assert!(run.boot_lines().is_empty(), "{}", run.serial);
    // Nothing booted: SeaBIOS reset the machine, which ends QEMU normally.
    assert_eq!(run.code, Some(0), "{}", run.serial);
}
