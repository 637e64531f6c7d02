//! Disassembles the generated ACPI tables with the ACPICA `iasl` compiler, which checks their
//! structure independently of the code that wrote them.
//!
//! Needs `iasl` (Debian package `acpica-tools`). Without it the test fails when `CI=true` and is
//! skipped with a loud message otherwise.

#![cfg(target_arch = "x86_64")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn iasl_available() -> bool {
    Command::new("iasl").arg("-v").output().is_ok()
}

/// A fresh directory under the system temp dir, unique to this process and case.
fn scratch_dir(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arch-acpi-iasl-{}-{case}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `iasl -d` on `file` and returns the disassembly it wrote next to it.
fn disassemble(dir: &Path, file: &str) -> String {
    let output = Command::new("iasl")
        .arg("-d")
        .arg(file)
        .current_dir(dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl -d {file} failed:\n{log}");
    let dsl = dir.join(Path::new(file).with_extension("dsl"));
    fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("no {}: {e}\n{log}", dsl.display()))
}

/// Counts the decoded lines "<label> ... : <value>" in iasl's data-table output.
fn flag_lines(text: &str, label: &str, value: &str) -> usize {
    text.lines()
        .filter(|l| l.contains(label))
        .filter(|l| l.rsplit(':').next().map(str::trim) == Some(value))
        .count()
}

fn check(boot: u32, max: u32) {
    let dir = scratch_dir(&format!("{boot}-{max}"));
    let tables = arch::acpi::tables(boot, max).unwrap();
    let mut disassembly = Vec::new();
    for (signature, bytes) in &tables {
        let file = format!("{signature}.dat");
        fs::write(dir.join(&file), bytes).unwrap();
    }
    for (signature, _) in &tables {
        // iasl only takes tables with the common 36-byte header; the RSDP has its own format
        // and is checked by the unit tests' walk from guest memory.
        if signature == "RSDP" {
            continue;
        }
        let file = format!("{signature}.dat");
        disassembly.push((signature.clone(), disassemble(&dir, &file)));
    }
    assert_eq!(disassembly.len(), 4, "XSDT, FACP, DSDT and APIC");
    let text = |sig: &str| {
        &disassembly
            .iter()
            .find(|(s, _)| s == sig)
            .unwrap_or_else(|| panic!("no {sig} table"))
            .1
    };

    let dsdt = text("DSDT");
    assert!(dsdt.contains("_S5_"), "{dsdt}");
    assert!(dsdt.contains("COM1"), "{dsdt}");
    assert!(dsdt.contains("PNP0501"), "{dsdt}");

    let madt = text("APIC");
    let processors = madt.matches("Processor Local APIC").count();
    assert_eq!(processors, max as usize, "{madt}");
    assert!(madt.contains("Interrupt Source Override"), "{madt}");
    assert!(madt.contains("Local APIC NMI"), "{madt}");

    assert_eq!(
        flag_lines(madt, "Processor Enabled", "1"),
        boot as usize,
        "{madt}"
    );
    assert_eq!(
        flag_lines(madt, "Runtime Online Capable", "1"),
        (max - boot) as usize,
        "{madt}"
    );

    let fadt = text("FACP");
    assert_eq!(flag_lines(fadt, "Hardware Reduced", "1"), 1, "{fadt}");
    assert_eq!(
        flag_lines(fadt, "Reset Register Supported", "1"),
        1,
        "{fadt}"
    );
    assert!(fadt.contains("\"ATRIUM\""), "{fadt}");

    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn iasl_disassembles_the_tables() {
    if !iasl_available() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("iasl is not installed; install the acpica-tools package");
        }
        eprintln!("\n*** SKIPPED: iasl not installed (apt-get install acpica-tools) ***\n");
        return;
    }
    check(2, 8);
    check(1, 1);
}
