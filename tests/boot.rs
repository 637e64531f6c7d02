//! Boots the in-tree report guest in each boot format and checks what it saw against what Atrium gave it.

mod common;

use common::*;

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

/// (start, size, type) per e820 line.
fn e820(run: &Run) -> Vec<(u64, u64, u32)> {
    run.lines("e820: 0x")
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (hex(f[0]), hex(f[1]), f[2].parse().unwrap())
        })
        .collect()
}

fn boot(format: &str, extra: &[&str]) -> Run {
    let kernel = guest(&format!("report.{format}"));
    let mut args = vec!["--kernel", kernel.as_str()];
    args.extend_from_slice(extra);
    let run = run_atrium(&args, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "atrium failed: {run:?}");
    run
}

fn check_format(file_ext: &str, reported: &str) {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir(&format!("boot-{file_ext}"));
    let initrd = dir.join("initrd.img");
    let bytes: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&initrd, &bytes).unwrap();
    let sum = bytes
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    let cmdline = "console=ttyS0 atrium.test=boot-formats quiet";
    let initrd_s = initrd.display().to_string();
    let run = boot(
        file_ext,
        &[
            "--cmdline",
            cmdline,
            "--initramfs",
            &initrd_s,
            "--memory",
            "size=128M",
            "--cpus",
            "boot=2",
        ],
    );

    assert_eq!(run.line("atrium-guest: format="), reported);
    assert_eq!(run.line("cmdline: "), cmdline);
    let initrd_line = run.line("initrd: ");
    assert!(
        initrd_line.ends_with(&format!("size={:#x} sum={sum:#x}", bytes.len())),
        "initrd line {initrd_line}, expected size {:#x} sum {sum:#x}",
        bytes.len()
    );
    // The initramfs sits page aligned in low RAM, below the 128 MiB end.
    let addr = hex(initrd_line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("addr="));
    assert_eq!(addr % 4096, 0);
    assert!(addr + bytes.len() as u64 <= 128 << 20);

    let entries = e820(&run);
    assert_eq!(
        entries,
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x60400, 2),
            (0x10_0000, (128 << 20) - 0x10_0000, 1)
        ]
    );
    assert_eq!(run.line("e820: count="), "3");
    assert!(run.line("acpi: rsdp=").contains("cpus=2"), "{}", run.serial);
    assert_eq!(run.line("mptable: cpus="), "2");
    assert_eq!(smp_summary(&run), "2/2 cpus up");
}

#[test]
fn bzimage_guest_sees_cmdline_initramfs_e820_and_cpus() {
    check_format("bzImage", "bzimage");
}

#[test]
fn elf_vmlinux_guest_sees_cmdline_initramfs_e820_and_cpus() {
    check_format("elf", "elf");
}

#[test]
fn pvh_guest_sees_cmdline_initramfs_e820_and_cpus() {
    check_format("pvh", "pvh");
}

#[test]
fn boot_params_carry_loader_type_cmdline_pointer_and_rsdp() {
    if !kvm_available() {
        return;
    }
    let run = boot("bzImage", &["--cmdline", "x"]);
    let bp = run.line("bootparams: ");
    assert!(bp.contains("loader=0xff"), "{bp}");
    assert!(bp.contains("cmdline_ptr=0x20000"), "{bp}");
    assert!(bp.contains("rsdp=0xe0000"), "{bp}");
    assert_eq!(
        run.line("acpi: rsdp=").split_whitespace().next(),
        Some("0xe0000")
    );
    assert_eq!(run.line("initrd: "), "none");
}

#[test]
fn memory_above_the_32bit_gap_is_reported_in_e820() {
    if !kvm_available() {
        return;
    }
    let run = boot("elf", &["--memory", "size=3584M"]);
    let entries = e820(&run);
    assert_eq!(
        entries.last(),
        Some(&(0x1_0000_0000, 512 << 20, 1)),
        "{entries:x?}"
    );
    assert!(
        entries.contains(&(0x10_0000, 0xc000_0000 - 0x10_0000, 1)),
        "{entries:x?}"
    );
}

#[test]
fn rtc_reports_host_time_in_utc() {
    if !kvm_available() {
        return;
    }
    let before = std::time::SystemTime::now();
    let run = boot("bzImage", &[]);
    let after = std::time::SystemTime::now();
    let rtc = run.line("rtc: ");
    let secs = parse_datetime(&rtc);
    let lo = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hi = after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        secs + 1 >= lo && secs <= hi + 1,
        "rtc {rtc} not within [{lo}, {hi}]"
    );
}

/// "YYYY-MM-DD HH:MM:SS" (UTC) to seconds since the epoch.
fn parse_datetime(s: &str) -> u64 {
    let p: Vec<u64> = s
        .split(['-', ' ', ':'])
        .map(|x| x.parse().unwrap_or_else(|_| panic!("bad rtc line {s}")))
        .collect();
    let (y, m, d) = (p[0], p[1], p[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + p[3] * 3600 + p[4] * 60 + p[5]
}

#[test]
fn demo_guest_greets_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let run = run_atrium(&["--cpus", "boot=2", "--memory", "size=256M"], GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(
        run.serial.contains("Hello from the Atrium demo guest"),
        "{}",
        run.serial
    );
    assert!(run.serial.contains("2 vCPU"), "{}", run.serial);
    assert!(
        run.serial.contains("256 MiB") || run.serial.contains("255 MiB"),
        "{}",
        run.serial
    );
}
