//! The fixed-format tables: FADT (hardware-reduced, with sleep and reset registers), MADT
//! (local APICs, IOAPIC, IRQ 0 override, LINT1 NMI) and MCFG (the PCI ECAM area).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::super::layout::{
    ACPI_PM_PORT, APIC_START, IOAPIC_START, PCI_MMCONFIG_SIZE, PCI_MMCONFIG_START,
};
use super::{oem_table_id, OEM_ID, OEM_REVISION};

/// Value written to the reset register to reset the VM.
const RESET_VALUE: u8 = 1;
/// FADT Hypervisor Vendor Identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"ATRIUM\0\0";

/// MADT revision 5 (ACPI 6.3) defines the "online capable" processor flag.
const MADT_REVISION: u8 = 5;
/// The MADT header: the common 36 bytes, local APIC address and flags.
const MADT_HEADER_LEN: u32 = 44;
const MADT_LAPIC_ADDRESS_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the platform also has dual 8259 PICs (PC-AT compatible).
const MADT_PCAT_COMPAT: u32 = 1;

const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const ISA_BUS: u8 = 0;
/// ISA IRQ 0 (the PIT) is wired to GSI 2.
const TIMER_IRQ: u8 = 0;
const TIMER_GSI: u32 = 2;
/// MPS INTI flags "conforms to the bus".
const INTI_CONFORMING: u16 = 0;
const ALL_PROCESSORS: u8 = 0xff;
const NMI_LINT: u8 = 1;

/// The only PCI segment.
const PCI_SEGMENT: u16 = 0;
/// Each bus takes 1 MiB of ECAM space.
const ECAM_BYTES_PER_BUS: u64 = 1 << 20;

/// The FADT: hardware-reduced ACPI, the sleep control/status and reset registers on the ACPI
/// PM port, the DSDT at `dsdt_addr`.
pub(super) fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm_port = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_PM_PORT),
    );
    let mut builder = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    builder.reset_reg = pm_port;
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = pm_port;
    builder.sleep_status_reg = pm_port;
    builder.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let mut bytes = Vec::new();
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT for `max_cpus` processors of which the first `boot_cpus` are enabled and the rest
/// online capable, with the IOAPIC as `ioapic_id`. The caller checks
/// `1 <= boot_cpus <= max_cpus <= 255`.
pub(super) fn madt(boot_cpus: u8, max_cpus: u8, ioapic_id: u8) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
    );
    // APIC_START is below 4 GiB.
    table.write_u32(MADT_LAPIC_ADDRESS_OFFSET, APIC_START as u32);
    table.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);

    let mut structures = Vec::new();
    for id in 0..max_cpus {
        structures.extend(local_apic(id, id < boot_cpus));
    }
    // IOAPIC_START is below 4 GiB; its pins start at GSI 0.
    IoApic::new(ioapic_id, IOAPIC_START as u32, 0).to_aml_bytes(&mut structures);

    structures.extend_from_slice(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, TIMER_IRQ]);
    structures.extend_from_slice(&TIMER_GSI.to_le_bytes());
    structures.extend_from_slice(&INTI_CONFORMING.to_le_bytes());

    structures.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    structures.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
    structures.push(NMI_LINT);

    table.append_slice(&structures);
    table.as_slice().to_vec()
}

/// The MADT Processor Local APIC structure of CPU `id` (its ACPI processor UID and APIC ID):
/// enabled, or disabled and online capable (a CPU that can be hot added). The DSDT's processor
/// devices return the same bytes from `_MAT`.
pub(super) fn local_apic(id: u8, enabled: bool) -> Vec<u8> {
    let status = if enabled {
        EnabledStatus::Enabled
    } else {
        EnabledStatus::DisabledOnlineCapable
    };
    let mut entry = Vec::new();
    ProcessorLocalApic::new(id, id, status).to_aml_bytes(&mut entry);
    entry
}

/// The MCFG: one ECAM allocation, segment 0, buses 0 to the last the ECAM area covers.
pub(super) fn mcfg() -> Vec<u8> {
    // 256 MiB of ECAM space covers buses 0-255, so the last bus fits a byte.
    let buses = PCI_MMCONFIG_SIZE / ECAM_BYTES_PER_BUS;
    let end_bus = u8::try_from(buses - 1).unwrap_or(u8::MAX);
    let mut table = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    table.add_ecam(PCI_MMCONFIG_START, PCI_SEGMENT, 0, end_bus);
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
    }

    #[test]
    fn fadt_fields() {
        let t = fadt(0xe1230);
        assert_eq!(&t[0..4], b"FACP");
        assert_eq!(t.len(), 276);
        assert_eq!(u32_at(&t, 4), 276);
        assert_eq!(sum(&t), 0);
        assert_eq!(t[8], 6, "major revision");
        assert_eq!(t[131], 5, "minor revision");
        assert_eq!(&t[10..16], b"ATRIUM");
        assert_eq!(u32_at(&t, 40), 0, "32-bit DSDT unused");
        assert_eq!(u64_at(&t, 140), 0xe1230, "X_DSDT");
        let flags = u32_at(&t, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let io_byte_0x600 = [1u8, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0];
        assert_eq!(t[116..128], io_byte_0x600, "RESET_REG");
        assert_eq!(t[128], 1, "RESET_VALUE");
        assert_eq!(t[244..256], io_byte_0x600, "SLEEP_CONTROL_REG");
        assert_eq!(t[256..268], io_byte_0x600, "SLEEP_STATUS_REG");
        assert_eq!(&t[268..276], b"ATRIUM\0\0");
    }

    /// Splits the MADT's interrupt controller structures into (type, bytes).
    fn structures(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < t.len() {
            let len = usize::from(t[at + 1]);
            assert!(len >= 2 && at + len <= t.len());
            out.push((t[at], t[at..at + len].to_vec()));
            at += len;
        }
        out
    }

    #[test]
    fn madt_contents() {
        let t = madt(2, 8, 2);
        assert_eq!(&t[0..4], b"APIC");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(t[8], 5);
        assert_eq!(sum(&t), 0);
        assert_eq!(u32_at(&t, 36), 0xfee0_0000);
        assert_eq!(u32_at(&t, 40), 1, "PCAT_COMPAT");

        let s = structures(&t);
        let lapics: Vec<_> = s.iter().filter(|(k, _)| *k == 0).collect();
        assert_eq!(lapics.len(), 8);
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!(e.len(), 8);
            assert_eq!((e[2] as usize, e[3] as usize), (i, i), "UID and APIC ID");
            let expected = if i < 2 { 1 } else { 2 };
            assert_eq!(u32_at(e, 4), expected, "flags of CPU {i}");
        }
        let ioapic: Vec<_> = s.iter().filter(|(k, _)| *k == 1).collect();
        assert_eq!(ioapic.len(), 1);
        let e = &ioapic[0].1;
        assert_eq!((e.len(), e[2]), (12, 2));
        assert_eq!((u32_at(e, 4), u32_at(e, 8)), (0xfec0_0000, 0));

        let iso: Vec<_> = s.iter().filter(|(k, _)| *k == 2).collect();
        assert_eq!(iso.len(), 1);
        assert_eq!(iso[0].1, vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);

        let nmi: Vec<_> = s.iter().filter(|(k, _)| *k == 4).collect();
        assert_eq!(nmi.len(), 1);
        assert_eq!(nmi[0].1, vec![4, 6, 0xff, 0, 0, 1]);
        assert_eq!(s.len(), 8 + 3);
    }

    #[test]
    fn mcfg_bytes() {
        let t = mcfg();
        assert_eq!(t.len(), 36 + 8 + 16);
        assert_eq!(&t[0..4], b"MCFG");
        assert_eq!(u32_at(&t, 4), 60, "length");
        assert_eq!(t[8], 1, "revision");
        assert_eq!(sum(&t), 0, "checksum");
        assert_eq!(&t[10..16], b"ATRIUM");
        assert_eq!(&t[16..24], b"ATRMMCFG");
        assert_eq!(t[36..44], [0; 8], "reserved");
        assert_eq!(u64_at(&t, 44), 0xe000_0000, "base address");
        assert_eq!(t[52..54], [0, 0], "segment");
        assert_eq!((t[54], t[55]), (0, 255), "start and end bus");
        assert_eq!(t[56..60], [0; 4], "reserved");
    }

    #[test]
    fn local_apic_entries() {
        assert_eq!(local_apic(0, true), [0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(local_apic(7, false), [0, 8, 7, 7, 2, 0, 0, 0]);
        assert_eq!(local_apic(254, true), [0, 8, 254, 254, 1, 0, 0, 0]);
    }

    #[test]
    fn madt_largest() {
        let t = madt(255, 255, 255);
        assert_eq!(sum(&t), 0);
        assert_eq!(t.len(), 44 + 255 * 8 + 12 + 10 + 6);
    }
}
