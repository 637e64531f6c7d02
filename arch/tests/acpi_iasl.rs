//! Checks the generated ACPI tables with the ACPICA tools, independently of the code that wrote
//! them: `iasl` disassembles every table (and compiles the DSDT's disassembly back), and
//! `acpiexec` loads the DSDT into the same AML interpreter and resource manager Linux uses and
//! evaluates the PCI host bridge's objects and the hotplug and power-button AML.
//!
//! acpiexec simulates every SystemMemory operation region with plain memory, so the hotplug
//! registers read back what was last written (zero at first) instead of what the VMM's devices
//! would answer; a small helper SSDT writes them to drive the methods through their paths.
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

fn check(boot: u32, max: u32, ram: u64, memory_slots: u32) {
    let dir = scratch_dir(&format!("{boot}-{max}-{ram}-{memory_slots}"));
    let tables = arch::acpi::tables(boot, max, ram, memory_slots).unwrap();
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
    check_hotplug_aml(dsdt, max, memory_slots);
    recompile(&dir, "DSDT.dsl");

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

/// The GED, power button, processor and memory hotplug devices and the PCI hotplug slots in the
/// disassembled DSDT `dsdt` of a VM with `max` possible CPUs and `memory_slots` memory slots.
fn check_hotplug_aml(dsdt: &str, max: u32, memory_slots: u32) {
    let count = |needle: &str| dsdt.matches(needle).count();
    for needle in [
        // The GED: identity, registers, interrupt 5 and the event dispatch.
        "Device (GED0)",
        "Name (_HID, \"ACPI0013\" /* Generic Event Device */)",
        "0xFE000000,         // Address Base",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {\n                    0x00000005,",
        "OperationRegion (GEDR, SystemMemory, 0xFE000000, 0x10)",
        "Method (_EVT, 1, NotSerialized)",
        "\\_SB.CPUS.CSCN ()",
        "\\_SB.MHPC.MSCN ()",
        "\\_SB.PCI0.PCNT ()",
        "Notify (\\_SB.PWRB, 0x80)",
        // The power button.
        "Device (PWRB)",
        "EisaId (\"PNP0C0C\")",
        // The processor container and its controller.
        "Device (CPUS)",
        "Name (_HID, \"ACPI0010\"",
        "Name (_CID, EisaId (\"PNP0A05\")",
        "OperationRegion (CHPR, SystemMemory, 0xFE001000, 0x10)",
        "CSEL,   32",
        "CEN,    1, \n                CINS,   1, \n                CRMV,   1, \n                CEJ0,   1",
        "Method (CSCN, 0, NotSerialized)",
        // The PCI hotplug controller in PCI0.
        "OperationRegion (PHPR, SystemMemory, 0xFE002000, 0x10)",
        "PCIU,   32, \n                PCID,   32, \n                B0EJ,   32, \n                PSNT,   32",
        "Method (PCNT, 0, Serialized)",
        // The memory hotplug controller.
        "Device (MHPC)",
        "EisaId (\"PNP0A06\")",
        "OperationRegion (MHPR, SystemMemory, 0xFE003000, 0x20)",
        "Method (MSCN, 0, NotSerialized)",
        "Method (MCRS, 1, Serialized)",
    ] {
        assert!(dsdt.contains(needle), "no {needle:?} in\n{dsdt}");
    }

    // One processor device per possible CPU, each with _STA, _MAT and _EJ0.
    let max = max as usize;
    assert_eq!(count("\"ACPI0007\""), max, "{dsdt}");
    for id in 0..max {
        assert!(dsdt.contains(&format!("Device (C{id:03X})")), "C{id:03X}");
    }
    assert!(!dsdt.contains(&format!("Device (C{max:03X})")));
    assert_eq!(count("Method (_MAT, 0, NotSerialized)"), max);

    // A slot device for slots 1-31 with its address, number and eject method.
    for slot in 1..=31u32 {
        let device = format!(
            "Device (S{slot:02X})\n            {{\n                Name (_ADR, 0x{:08X})",
            slot << 16
        );
        assert!(dsdt.contains(&device), "no {device:?} in\n{dsdt}");
        let eject = format!("B0EJ = {}", asl_integer(1 << slot));
        assert!(dsdt.contains(&eject), "no {eject:?} in\n{dsdt}");
    }
    assert!(!dsdt.contains("Device (S00)"));
    assert_eq!(count("Name (_SUN, "), 31);

    // One memory device per slot.
    let slots = memory_slots as usize;
    assert_eq!(count("EisaId (\"PNP0C80\")"), slots, "{dsdt}");
    for slot in 0..slots {
        assert!(
            dsdt.contains(&format!("Device (M{slot:03X})")),
            "M{slot:03X}"
        );
    }
    assert_eq!(count("Return (MCRS ("), slots);

    // _STA and _EJ0 of every processor and memory device, and _EJ0 of every PCI slot.
    assert_eq!(count("Method (_STA, 0, NotSerialized)"), max + slots);
    assert_eq!(count("Method (_EJ0, 1, NotSerialized)"), max + 31 + slots);
}

/// An integer constant as iasl disassembles it: as many hexadecimal digits as its encoding
/// (byte, word or dword) holds.
fn asl_integer(value: u32) -> String {
    match value {
        0..=0xff => format!("0x{value:02X}"),
        0x100..=0xffff => format!("0x{value:04X}"),
        _ => format!("0x{value:08X}"),
    }
}

/// Compiles the disassembly `file` in `dir` back to AML: iasl must find no error in it.
fn recompile(dir: &Path, file: &str) {
    let output = Command::new("iasl")
        .arg("-p")
        .arg("recompiled")
        .arg(file)
        .current_dir(dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl {file} failed:\n{log}");
    assert!(log.contains("Compilation successful. 0 Errors"), "{log}");
}

#[test]
fn iasl_disassembles_the_tables() {
    if !tool_available("iasl") {
        return;
    }
    check(2, 8, 512 << 20, 4);
    check(1, 1, 6 * GIB, 0);
    check(3, 255, 6 * GIB, arch::acpi::MAX_MEMORY_SLOTS);
}

/// Runs the `;`-separated debugger `commands` in `acpiexec` on the DSDT in `dir` and returns
/// its output, after checking that ACPICA reported no error or warning.
fn acpiexec(dir: &Path, commands: &str) -> String {
    acpiexec_with(dir, commands, &[])
}

/// [`acpiexec`] with the further AML tables `extra` (files in `dir`) loaded after the DSDT.
fn acpiexec_with(dir: &Path, commands: &str, extra: &[&str]) -> String {
    let output = Command::new("acpiexec")
        .arg("-b")
        .arg(commands)
        .arg("DSDT.dat")
        .args(extra)
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

/// The bytes of every buffer a method returned, as acpiexec prints them: short buffers on the
/// "[Buffer] Length NN = 0000: ..." line, longer ones in rows of 16 on the lines after it.
fn returned_buffers(text: &str) -> Vec<Vec<u8>> {
    let mut buffers = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((_, rest)) = line.split_once("[Buffer] Length ") else {
            continue;
        };
        let (len, mut row) = rest.split_once(" =").unwrap();
        let len = usize::from_str_radix(len.trim(), 16).unwrap();
        let mut bytes = Vec::new();
        loop {
            if let Some((_, dump)) = row.split_once(": ") {
                let hex = dump.split("//").next().unwrap();
                bytes.extend(
                    hex.split_whitespace()
                        .map(|b| u8::from_str_radix(b, 16).unwrap()),
                );
            }
            if bytes.len() >= len {
                break;
            }
            row = lines.next().unwrap();
        }
        assert_eq!(bytes.len(), len, "{text}");
        buffers.push(bytes);
    }
    buffers
}

/// The value of every integer a method returned or a field held.
fn returned_integers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split_once("[Integer] = "))
        .map(|(_, value)| u64::from_str_radix(value.trim(), 16).unwrap())
        .collect()
}

/// Every notification acpiexec received, as (object name, value), sorted (they are delivered
/// asynchronously, so their order is not defined).
fn notifications(text: &str) -> Vec<(String, u8)> {
    let mut received: Vec<(String, u8)> = text
        .lines()
        .filter_map(|l| l.split_once(" Notify on ["))
        .map(|(_, rest)| {
            let (name, rest) = rest.split_once(']').unwrap();
            let value = rest.split_once("Value 0x").unwrap().1;
            let value = u8::from_str_radix(&value[..2], 16).unwrap();
            (name.trim_end_matches('_').to_string(), value)
        })
        .collect();
    received.sort();
    received
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
    let tables = arch::acpi::tables(1, 1, ram, 0).unwrap();
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

/// An SSDT that plays the VMM's side of the hotplug registers for acpiexec: its own regions
/// over the four register blocks (acpiexec backs them with the same simulated memory as the
/// DSDT's regions) and methods to set the pending events and status bits. The offsets are the
/// design notes', not the DSDT's, so a misplaced DSDT field shows up.
const REGISTER_HELPER: &str = r#"DefinitionBlock ("", "SSDT", 2, "ATRIUM", "HPREGS", 1)
{
    OperationRegion (TGED, SystemMemory, 0xFE000000, 0x10)
    Field (TGED, DWordAcc, NoLock, Preserve) { TGEV, 32 }
    OperationRegion (TCPU, SystemMemory, 0xFE001000, 0x10)
    Field (TCPU, DWordAcc, NoLock, Preserve) { TCSL, 32 }
    Field (TCPU, ByteAcc, NoLock, Preserve) { Offset (4), TCST, 8 }
    OperationRegion (TPCI, SystemMemory, 0xFE002000, 0x10)
    Field (TPCI, DWordAcc, NoLock, Preserve) { TPUP, 32, TPDN, 32, TPEJ, 32 }
    OperationRegion (TMEM, SystemMemory, 0xFE003000, 0x20)
    Field (TMEM, DWordAcc, NoLock, Preserve) { TMSL, 32, TMBL, 32, TMBH, 32, TMLL, 32, TMLH, 32 }
    Field (TMEM, ByteAcc, NoLock, Preserve) { Offset (20), TMST, 8 }
    Method (SGED, 1) { TGEV = Arg0 }
    Method (SCPU, 1) { TCST = Arg0 }
    Method (SPCI, 2) { TPUP = Arg0  TPDN = Arg1 }
    Method (SMEM, 3) { TMBL = Arg0  TMBH = Arg0 >> 32  TMLL = Arg1  TMLH = Arg1 >> 32  TMST = Arg2 }
}
"#;

/// Status register bits of the CPU and memory hotplug controllers.
const ENABLED: u8 = 1 << 0;
const INSERTING: u8 = 1 << 1;
const REMOVING: u8 = 1 << 2;
const EJECT: u8 = 1 << 3;

/// The MADT's Processor Local APIC structure for `id`.
fn madt_local_apic(madt: &[u8], id: u8) -> Vec<u8> {
    let mut at = 44;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        if madt[at] == 0 && madt[at + 3] == id {
            return madt[at..at + len].to_vec();
        }
        at += len;
    }
    panic!("no local APIC {id} in the MADT");
}

/// The (minimum, maximum, length) of the QWordMemory descriptor a memory device's `_CRS`
/// returned.
fn qword_range(template: &[u8]) -> (u64, u64, u64) {
    assert_eq!(
        template.len(),
        46 + 2,
        "one QWord descriptor and the end tag"
    );
    assert_eq!(
        template[0..6],
        [0x8a, 0x2b, 0, 0, 0x0c, 0x03],
        "cacheable read-write memory"
    );
    let qword = |at: usize| u64::from_le_bytes(template[at..at + 8].try_into().unwrap());
    (qword(14), qword(22), qword(38))
}

#[test]
fn acpiexec_runs_the_hotplug_and_power_button_aml() {
    if !tool_available("acpiexec") || !tool_available("iasl") {
        return;
    }
    let dir = scratch_dir("acpiexec-hotplug");
    // 2 boot CPUs of 4, 2 memory slots.
    let tables = arch::acpi::tables(2, 4, 512 << 20, 2).unwrap();
    let table = |sig: &str| &tables.iter().find(|(s, _)| s == sig).unwrap().1;
    fs::write(dir.join("DSDT.dat"), table("DSDT")).unwrap();
    fs::write(dir.join("regs.asl"), REGISTER_HELPER).unwrap();
    let output = Command::new("iasl")
        .arg("regs.asl")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let madt = table("APIC");

    // With every register zero: nothing is present, nothing pending.
    let zero = acpiexec(
        &dir,
        "evaluate \\_SB.CPUS.C000._STA; evaluate \\_SB.MHPC.M001._STA; \
         evaluate \\_SB.PCI0.S05._ADR; evaluate \\_SB.PCI0.S05._SUN; \
         evaluate \\_SB.PCI0.S1F._ADR; evaluate \\_SB.PCI0.S1F._SUN; \
         evaluate \\_SB.GED0._UID; evaluate \\_SB.PWRB._UID; evaluate \\_SB.CPUS.C003._UID; \
         evaluate \\_SB.CPUS.C003._MAT; evaluate \\_SB.MHPC.M001._CRS; \
         execute \\_SB.GED0._EVT 5; execute \\_SB.CPUS.CSCN; execute \\_SB.MHPC.MSCN; \
         execute \\_SB.PCI0.PCNT",
    );
    assert_eq!(
        returned_integers(&zero),
        [0, 0, 0x5_0000, 5, 0x1f_0000, 0x1f, 0, 0, 3],
        "{zero}"
    );
    let buffers = returned_buffers(&zero);
    assert_eq!(buffers.len(), 2, "{zero}");
    // A CPU that is not present is online capable, exactly as the MADT lists it.
    assert_eq!(buffers[0], madt_local_apic(madt, 3));
    assert_eq!(buffers[0], [0, 8, 3, 3, 2, 0, 0, 0]);
    // An empty slot's range is empty.
    assert_eq!(qword_range(&buffers[1]), (0, 0, 0));
    assert_eq!(notifications(&zero), []);

    // CPU 1 present and being inserted, memory slot 1 present at 5 GiB (128 MiB) and asked to
    // go, PCI slots 1 and 5 came up and slot 31 is asked to go down, every GED event pending.
    let setup = format!(
        "execute \\SCPU {:#x}; execute \\SMEM 0x140000000 0x8000000 {:#x}; \
         execute \\SPCI 0x22 0x80000000; execute \\SGED 0xf",
        ENABLED | INSERTING,
        ENABLED | REMOVING
    );
    let events = acpiexec_with(
        &dir,
        &format!(
            "{setup}; evaluate \\_SB.CPUS.C001._STA; evaluate \\_SB.CPUS.C001._MAT; \
             evaluate \\_SB.MHPC.M001._STA; evaluate \\_SB.MHPC.M001._CRS; \
             execute \\_SB.GED0._EVT 5; evaluate \\TCST; evaluate \\TMST"
        ),
        &["regs.aml"],
    );
    let buffers = returned_buffers(&events);
    assert_eq!(buffers.len(), 2, "{events}");
    // A present CPU is enabled, as the MADT lists a boot CPU.
    assert_eq!(buffers[0], madt_local_apic(madt, 1));
    assert_eq!(buffers[0], [0, 8, 1, 1, 1, 0, 0, 0]);
    assert_eq!(
        qword_range(&buffers[1]),
        (0x1_4000_0000, 0x1_47ff_ffff, 0x800_0000)
    );
    // _STA of both, then the status bytes after the scans cleared the bits they handled:
    // each clear writes only its own bit (the simulated register keeps what was written).
    assert_eq!(
        returned_integers(&events),
        [0xf, 0xf, u64::from(INSERTING), u64::from(REMOVING)],
        "{events}"
    );
    let expected: Vec<(String, u8)> = [
        ("C000", 1),
        ("C001", 1),
        ("C002", 1),
        ("C003", 1),
        ("M000", 3),
        ("M001", 3),
        ("PWRB", 0x80),
        ("S01", 1),
        ("S05", 1),
        ("S1F", 3),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), *value))
    .collect();
    assert_eq!(notifications(&events), expected, "{events}");

    // Ejects: each writes the design notes' register and bit.
    let ejects = acpiexec_with(
        &dir,
        "execute \\_SB.PCI0.S05._EJ0 0; evaluate \\TPEJ; \
         execute \\_SB.CPUS.C002._EJ0 0; evaluate \\TCSL; evaluate \\TCST; \
         execute \\_SB.MHPC.M001._EJ0 0; evaluate \\TMSL; evaluate \\TMST",
        &["regs.aml"],
    );
    assert_eq!(
        returned_integers(&ejects),
        [1 << 5, 2, u64::from(EJECT), 1, u64::from(EJECT)],
        "{ejects}"
    );
    assert_eq!(notifications(&ejects), []);

    let _ = fs::remove_dir_all(&dir);
}
