//! Checks the generated ACPI tables with the ACPICA tools, independently of the code that wrote
//! them: `iasl` disassembles every table, and `acpiexec` loads the DSDT into the same AML
//! interpreter and resource manager Linux uses and evaluates the PCI host bridge's objects.
//!
//! Needs `iasl` and `acpiexec` (Debian package `acpica-tools`). Without them the tests fail when
//! `CI=true` and are skipped with a loud message otherwise.

#![cfg(target_arch = "x86_64")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GIB: u64 = 1 << 30;

/// Whether `tool` runs; if not, fails under CI and returns false (skip) otherwise.
fn tool_available(tool: &str) -> bool {
    if Command::new(tool).arg("-v").output().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{tool} is not installed; install the acpica-tools package");
    }
    eprintln!("\n*** SKIPPED: {tool} not installed (apt-get install acpica-tools) ***\n");
    false
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

fn check(boot: u32, max: u32, ram: u64) {
    let dir = scratch_dir(&format!("{boot}-{max}-{ram}"));
    let tables = arch::acpi::tables(boot, max, ram).unwrap();
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
    assert_eq!(disassembly.len(), 5, "XSDT, FACP, DSDT, APIC and MCFG");
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

    // The PCI host bridge, its windows and routing, and the ECAM reservation.
    for needle in [
        "Device (PCI0)",
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_PRT, Package (0x7C)",
        "Method (_OSC, 4, NotSerialized)",
        "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
        "WordBusNumber (ResourceProducer",
        "0x0CF8,             // Range Minimum",
        "0x0CF7,             // Range Maximum",
        "0x0D00,             // Range Minimum",
        "0xC0000000,         // Range Minimum",
        "0xDFFFFFFF,         // Range Maximum",
        "Device (MRES)",
        "EisaId (\"PNP0C02\")",
        "0xE0000000,         // Address Base",
        "0x10000000,         // Address Length",
    ] {
        assert!(dsdt.contains(needle), "no {needle:?} in\n{dsdt}");
    }
    let (mmio64_start, mmio64_size) = arch::layout::pci_mmio64_window(ram);
    let min = format!("0x{mmio64_start:016X}, // Range Minimum");
    let max_addr = format!(
        "0x{:016X}, // Range Maximum",
        mmio64_start + mmio64_size - 1
    );
    assert!(dsdt.contains(&min), "no {min:?} in\n{dsdt}");
    assert!(dsdt.contains(&max_addr), "no {max_addr:?} in\n{dsdt}");

    let xsdt = text("XSDT");
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 3, "{xsdt}");

    let mcfg = text("MCFG");
    assert_eq!(
        flag_lines(mcfg, "Base Address", "00000000E0000000"),
        1,
        "{mcfg}"
    );
    assert_eq!(
        flag_lines(mcfg, "Segment Group Number", "0000"),
        1,
        "{mcfg}"
    );
    assert_eq!(flag_lines(mcfg, "Start Bus Number", "00"), 1, "{mcfg}");
    assert_eq!(flag_lines(mcfg, "End Bus Number", "FF"), 1, "{mcfg}");

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
    if !tool_available("iasl") {
        return;
    }
    check(2, 8, 512 << 20);
    check(1, 1, 6 * GIB);
}

/// Runs the `;`-separated debugger `commands` in `acpiexec` on the DSDT in `dir` and returns
/// its output, after checking that ACPICA reported no error or warning.
fn acpiexec(dir: &Path, commands: &str) -> String {
    let output = Command::new("acpiexec")
        .arg("-b")
        .arg(commands)
        .arg("DSDT.dat")
        .current_dir(dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "acpiexec {commands} failed:\n{log}"
    );
    assert!(!log.contains("ACPI Error"), "{log}");
    assert!(!log.contains("ACPI Warning"), "{log}");
    assert!(!log.contains("ACPI Exception"), "{log}");
    log
}

/// The value of every "<label> : <hex>" line of `text`, in order.
fn hex_fields(text: &str, label: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split_once(" : "))
        .filter(|(name, _)| name.trim() == label)
        .map(|(_, value)| u64::from_str_radix(value.trim(), 16).unwrap())
        .collect()
}

/// The bytes of every buffer a method returned, as acpiexec prints them.
fn returned_buffers(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter_map(|l| l.split_once("[Buffer] Length "))
        .map(|(_, rest)| {
            let dump = rest.split_once("0000:").unwrap().1;
            let hex = dump.split("//").next().unwrap();
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect()
        })
        .collect()
}

/// `ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766")` in acpiexec's buffer argument syntax.
const PCI_OSC_UUID: &str = "(5b 4d db 33 f7 1f 1c 40 96 57 74 41 c0 3d d7 66)";

#[test]
fn acpiexec_evaluates_the_pci_objects() {
    if !tool_available("acpiexec") {
        return;
    }
    let ram = 6 * GIB;
    let dir = scratch_dir("acpiexec");
    let tables = arch::acpi::tables(1, 1, ram).unwrap();
    let dsdt = &tables.iter().find(|(s, _)| s == "DSDT").unwrap().1;
    fs::write(dir.join("DSDT.dat"), dsdt).unwrap();

    // The routing table as ACPICA's resource manager decodes it: every pin of slots 1-31, each
    // to the GSI the VMM's interrupt wiring uses.
    let pci0 = acpiexec(&dir, "resources \\_SB.PCI0");
    let addresses = hex_fields(&pci0, "Address");
    let pins = hex_fields(&pci0, "Pin");
    let gsis = hex_fields(&pci0, "Source Index");
    assert_eq!((addresses.len(), pins.len(), gsis.len()), (124, 124, 124));
    let mut expected = Vec::new();
    for slot in 1..=31u8 {
        for pin in 0..4u8 {
            let gsi = arch::layout::pci_intx_gsi(slot, pin).unwrap();
            expected.push((
                (u64::from(slot) << 16) | 0xffff,
                u64::from(pin),
                u64::from(gsi),
            ));
        }
    }
    let routed: Vec<_> = (0..124).map(|i| (addresses[i], pins[i], gsis[i])).collect();
    assert_eq!(routed, expected);

    // The host bridge's windows as the resource manager decodes them.
    let minimums = hex_fields(&pci0, "Address Minimum");
    let maximums = hex_fields(&pci0, "Address Maximum");
    let (mmio64_start, mmio64_size) = arch::layout::pci_mmio64_window(ram);
    assert_eq!(mmio64_start, 7 * GIB);
    let windows: Vec<_> = minimums.into_iter().zip(maximums).collect();
    assert_eq!(
        windows,
        [
            (0, 0),
            (0xcf8, 0xcf8),
            (0, 0xcf7),
            (0xd00, 0xffff),
            (0xc000_0000, 0xdfff_ffff),
            (mmio64_start, mmio64_start + mmio64_size - 1),
        ],
        "{pci0}"
    );

    let mres = acpiexec(&dir, "resources \\_SB.MRES");
    assert_eq!(hex_fields(&mres, "Address"), [0xe000_0000], "{mres}");
    assert_eq!(hex_fields(&mres, "Address Length"), [0x1000_0000], "{mres}");

    // _OSC: a query for every control bit gets the five granted ones and "capabilities masked";
    // a request for granted bits succeeds unchanged; a wrong revision or UUID is flagged.
    let osc = |uuid: &str, revision: u8, status: u8, control: u8| {
        format!(
            "execute \\_SB.PCI0._OSC {uuid} {revision} 3 ({status:02x} 00 00 00 1f 00 00 00 {control:02x} 00 00 00)"
        )
    };
    let other_uuid = "(00 11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff)";
    let commands = [
        osc(PCI_OSC_UUID, 1, 1, 0xff),
        osc(PCI_OSC_UUID, 1, 0, 0x1d),
        osc(PCI_OSC_UUID, 2, 0, 0x1d),
        osc(other_uuid, 1, 0, 0x1d),
    ]
    .join(";");
    let results = returned_buffers(&acpiexec(&dir, &commands));
    assert_eq!(
        results,
        [
            vec![0x11, 0, 0, 0, 0x1f, 0, 0, 0, 0x1f, 0, 0, 0],
            vec![0x00, 0, 0, 0, 0x1f, 0, 0, 0, 0x1d, 0, 0, 0],
            vec![0x08, 0, 0, 0, 0x1f, 0, 0, 0, 0x1d, 0, 0, 0],
            vec![0x04, 0, 0, 0, 0x1f, 0, 0, 0, 0x1d, 0, 0, 0],
        ]
    );

    let _ = fs::remove_dir_all(&dir);
}
