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

/// Kills process `pid` unless `done` is set within `limit`: a bound on a test that reads a live VM's output.
fn watchdog(
    pid: u32,
    limit: Duration,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let thread = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while !flag.load(Ordering::SeqCst) {
            if start.elapsed() > limit {
                // SAFETY: kill has no memory-safety preconditions; the pid is our child, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (done, thread)
}

/// `raw` without terminal escape sequences (`ESC [ ... letter`, `ESC c`) and carriage returns: SeaBIOS's serial
/// console and GRUB interleave cursor and colour sequences with the text.
fn plain(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    // Parameters and intermediates, up to the final letter.
                    while chars.next().is_some_and(|p| !p.is_ascii_alphabetic()) {}
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Reads `out` into `seen` until its plain text contains `needle` (panics, showing the text, if the output ends).
fn read_until_text(out: &mut impl std::io::Read, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 512];
    while !plain(seen).contains(needle) {
        let n = out.read(&mut buf).expect("read guest output");
        assert!(n > 0, "output ended before '{needle}': {}", plain(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn plain_text_drops_escape_sequences_and_carriage_returns() {
    assert_eq!(
        plain(b"\x1bc\x1b[?7l\x1b[0;30;47mWelcome to GRUB\r\x1b[5;78H!\r\n"),
        "Welcome to GRUB!\n"
    );
}

#[test]
fn grub_shows_its_menu_on_the_serial_console_and_runs_the_chosen_entry() {
    use std::io::Write;
    use std::process::Stdio;
    if !seabios_available() {
        return;
    }
    let dir = scratch_dir("fw-grub");
    let image = dir.join("grub.img");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/make-grub-disk.sh");
    let made = std::process::Command::new("bash")
        .arg(&script)
        .arg(&image)
        .output()
        .expect("run make-grub-disk.sh");
    if !made.status.success() {
        let why = String::from_utf8_lossy(&made.stderr);
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("cannot build the GRUB disk under CI: {why}");
        }
        eprintln!("SKIPPED: cannot build the GRUB disk: {why}");
        return;
    }
    let disk = format!("path={},readonly=on", image.display());
    let debug_console = format!("file={}", dir.join("debugcon.log").display());
    let mut child = atrium()
        .args(["--firmware", SEABIOS, "--disk", &disk])
        .args(["--debug-console", &debug_console])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start atrium");
    let (done, guard) = watchdog(child.id(), FIRMWARE_LIMIT);
    let mut out = child.stdout.take().expect("stdout piped");
    let mut input = child.stdin.take().expect("stdin piped");
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    // SeaBIOS boots GRUB from the virtio-blk disk; GRUB draws its menu on COM1 and counts down.
    read_until_text(&mut out, &mut seen, "GRUB loading.");
    read_until_text(&mut out, &mut seen, "GNU GRUB  version 2.");
    read_until_text(&mut out, &mut seen, "*Atrium GRUB test");
    read_until_text(&mut out, &mut seen, "will be executed automatically in");
    eprintln!("GRUB menu after {:?}", start.elapsed());
    // Enter runs the highlighted entry: GRUB read the key from the serial port.
    input.write_all(b"\r").expect("send Enter");
    read_until_text(&mut out, &mut seen, "atrium-grub: entry selected");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = child.kill();
    let _ = child.wait();
    guard.join().expect("watchdog");
    let text = plain(&seen);
    assert!(text.contains("SeaBIOS (version "), "{text}");
    // Enter ran the entry before the countdown did.
    assert!(!text.contains("executed automatically in 0s"), "{text}");
}
