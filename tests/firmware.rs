//! Firmware boot: Debian's SeaBIOS under Atrium, checked through what it prints on the serial console (sercon) and
//! on the debug console (port 0x402).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Debian's SeaBIOS (package `seabios`).
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// SeaBIOS runs in the host's instruction emulator here (seconds, not milliseconds); this only guards against hangs.
const FIRMWARE_LIMIT: Duration = Duration::from_secs(180);

/// Whether SeaBIOS and KVM are there. Under CI their absence fails the test; elsewhere the test is skipped loudly.
fn seabios_available() -> bool {
    if !kvm_available() {
        return false;
    }
    if Path::new(SEABIOS).is_file() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{SEABIOS} is required under CI (apt-get install seabios)");
    }
    eprintln!("SKIPPED: {SEABIOS} is not installed (apt-get install seabios)");
    false
}

/// Boots SeaBIOS with `extra` arguments, the debug console in `dir/debugcon.log`; returns the run and that log.
fn boot_firmware(dir: &Path, extra: &[&str]) -> (Run, String) {
    let log = dir.join("debugcon.log");
    let debug_console = format!("file={}", log.display());
    let mut args = vec![
        "--firmware",
        SEABIOS,
        "--debug-console",
        debug_console.as_str(),
    ];
    args.extend_from_slice(extra);
    let run = run_atrium(&args, FIRMWARE_LIMIT);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    (run, log)
}

/// SeaBIOS's own report of the RAM fw_cfg gave it: (address, length) of each `qemu/e820` RAM line.
fn reported_ram(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("qemu/e820: addr "))
        .filter(|l| l.ends_with("[RAM]"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(f[0]), hex(f[2]))
        })
        .collect()
}

fn check_machine(name: &str, cpus: u32, memory: &str, ram: &[(u64, u64)]) {
    let dir = scratch_dir(name);
    let cpus_arg = format!("boot={cpus}");
    let memory_arg = format!("size={memory}");
    let (run, log) = boot_firmware(
        &dir,
        &[
            "--cpus",
            &cpus_arg,
            "--memory",
            &memory_arg,
            "--boot-timeout",
            "1",
        ],
    );
    // No disk: SeaBIOS gives up, waits --boot-timeout, resets, and Atrium says why it stopped.
    assert_eq!(run.code(), 6, "{run:?}");
    assert_eq!(
        run.stderr.trim_end(),
        "atrium: the firmware found no bootable disk and gave up after --boot-timeout=1 s; give a --disk with a \
         boot loader (and bootindex= to choose among several)",
    );
    // The banner and the boot attempts reach the serial console through sercon.
    assert!(run.serial.contains("SeaBIOS (version "), "{run:?}");
    assert!(
        run.serial
            .contains("No bootable device.  Retrying in 1 seconds."),
        "{run:?}"
    );
    // What SeaBIOS found: the CPUs that answered its INIT/SIPI, the RAM from fw_cfg, Atrium's ACPI tables.
    assert!(
        log.contains(&format!("Found {cpus} cpu(s) max supported {cpus} cpu(s)")),
        "{log}"
    );
    assert_eq!(reported_ram(&log), ram, "{log}");
    assert!(log.contains("Found QEMU fw_cfg"), "{log}");
    assert!(log.contains("QEMU fw_cfg DMA interface supported"), "{log}");
    assert!(
        log.contains("(via xsdt)"),
        "ACPI tables from the table loader: {log}"
    );
    assert!(log.contains("sercon: using ioport 0x3f8"), "{log}");
}

#[test]
fn seabios_sees_one_cpu_and_128_mib() {
    if !seabios_available() {
        return;
    }
    check_machine("fw-1cpu", 1, "128M", &[(0, 128 << 20)]);
}

#[test]
fn seabios_sees_four_cpus_and_3_5_gib() {
    if !seabios_available() {
        return;
    }
    // 3 GiB below the 32-bit hole, the rest above 4 GiB.
    check_machine("fw-4cpu", 4, "3584M", &[(0, 3 << 30), (1 << 32, 512 << 20)]);
}

#[test]
fn bad_firmware_images_are_refused_with_one_line() {
    let dir = scratch_dir("fw-bad");
    let small = dir.join("small.bin");
    std::fs::write(&small, vec![0u8; 1000]).unwrap();
    let small_arg = small.display().to_string();
    let run = run_atrium(&["--firmware", &small_arg], GUEST_LIMIT);
    assert_eq!(run.code(), 1, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr
            .contains("1000 bytes; a firmware image is a whole number of 4 KiB pages"),
        "{run:?}"
    );

    let run = run_atrium(&["--firmware", "/nonexistent/bios.bin"], GUEST_LIMIT);
    assert_eq!(run.code(), 1, "{run:?}");
    assert!(run.stderr.starts_with("atrium: --firmware"), "{run:?}");

    let run = run_atrium(
        &["--firmware", &small_arg, "--kernel", &small_arg],
        GUEST_LIMIT,
    );
    assert_eq!(run.code(), 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("atrium: --firmware and --kernel both given"),
        "{run:?}"
    );

    let run = run_atrium(&["--boot-timeout", "3"], GUEST_LIMIT);
    assert_eq!(run.code(), 2, "--boot-timeout needs --firmware: {run:?}");
}

/// `path=<disk>,readonly=on` plus any extra keys.
fn disk_arg(disk: guests::BootDisk, extra: &str) -> String {
    format!("path={},readonly=on{extra}", disk.path().display())
}

/// The `atrium-boot:` lines the guest printed on the serial console.
fn boot_lines(run: &Run) -> Vec<String> {
    run.lines("atrium-boot: ")
        .into_iter()
        .map(|l| format!("atrium-boot: {l}"))
        .collect()
}

#[test]
fn seabios_boots_the_boot_sector_from_virtio_blk_which_reads_its_next_sector_and_powers_off() {
    if !seabios_available() {
        return;
    }
    let dir = scratch_dir("fw-bootdisk");
    let disk = disk_arg(guests::BootDisk::A, "");
    let (run, log) = boot_firmware(&dir, &["--disk", &disk]);
    // The boot sector printed through INT 10h (sercon), read sector 1 through INT 13h on virtio-blk, and powered off
    // through the ACPI PM register: exit 0.
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        boot_lines(&run),
        guests::BootDisk::A.boot_lines(),
        "{run:?}"
    );
    assert!(log.contains("Booting from 0000:7c00"), "{log}");
}

#[test]
fn the_boot_order_follows_bootindex_and_a_non_bootable_disk_is_skipped() {
    if !seabios_available() {
        return;
    }
    use guests::BootDisk::{NonBootable, A, B};
    let dir = scratch_dir("fw-bootorder");
    // Disk A comes first on the PCI bus, but B has bootindex=0.
    let (a, b) = (disk_arg(A, ""), disk_arg(B, ",bootindex=0"));
    let (run, _) = boot_firmware(&dir, &["--disk", &a, "--disk", &b]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(boot_lines(&run), B.boot_lines(), "{run:?}");

    // A disk without a boot signature ahead of a bootable one on the PCI bus: the boot order puts the bootable one
    // first, and the other is never tried.
    let (n, a) = (disk_arg(NonBootable, ""), disk_arg(A, ",bootindex=0"));
    let (run, _) = boot_firmware(&dir, &["--disk", &n, "--disk", &a]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(boot_lines(&run), A.boot_lines(), "{run:?}");
    assert!(!run.serial.contains("not a bootable disk"), "{run:?}");

    // Alone, it is refused (SeaBIOS has one hard-disk boot entry, drive 0x80, and does not fall through to a second
    // hard disk), and Atrium ends with exit 6 after the boot timeout.
    let n = disk_arg(NonBootable, "");
    let (run, _) = boot_firmware(&dir, &["--disk", &n, "--boot-timeout", "1"]);
    assert_eq!(run.code(), 6, "{run:?}");
    assert!(
        run.serial.contains("Boot failed: not a bootable disk"),
        "{run:?}"
    );
    assert!(boot_lines(&run).is_empty(), "{run:?}");
}
