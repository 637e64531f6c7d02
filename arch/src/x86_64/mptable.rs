//! The Intel MultiProcessor Specification 1.4 table: the floating pointer at the start of the EBDA
//! and the configuration table right after it.
//!
//! Guests that read ACPI ignore it; it is there for kernels and boot code that only look for
//! the MP table.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START};

/// Errors from building the MP table.
#[derive(Debug, Error)]
pub enum Error {
    /// A guest needs at least one CPU.
    #[error("the MP table needs at least one CPU; configure one or more vCPUs")]
    NoCpus,
    /// The table would not fit in the EBDA.
    #[error("an MP table for {cpus} CPUs needs {size} bytes but the EBDA holds {space}; use at most {max_cpus} boot vCPUs")]
    TooManyCpus {
        /// CPUs asked for.
        cpus: u32,
        /// Bytes the table would take.
        size: usize,
        /// Bytes available.
        space: usize,
        /// The most CPUs that fit.
        max_cpus: u32,
    },
    /// Writing the table into guest memory failed.
    #[error("cannot write the MP table at {0:#x} into guest memory; give the guest at least 1 MiB of RAM")]
    GuestWrite(u64),
}

const SPEC_REV_1_4: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const OEM_ID: &[u8; 8] = b"ATRIUM  ";
const PRODUCT_ID: &[u8; 12] = b"ATRIUM VMM  ";

// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

// Interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const APIC_VERSION: u8 = 0x14;
/// Family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1 EDX: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
const ISA_BUS_ID: u8 = 0;
/// Interrupt flags "conforms to the bus" (edge, active high for ISA).
const CONFORMING: u16 = 0;
/// Every local APIC.
const ALL_LAPICS: u8 = 0xff;
const ISA_IRQS: u8 = 16;
/// The PIT's IRQ 0 arrives on IOAPIC pin 2 (pin 0 is the legacy ExtINT input).
const TIMER_IRQ: u8 = 0;
const TIMER_PIN: u8 = 2;

/// Bytes the floating pointer and configuration table take for `num_cpus`.
fn table_size(num_cpus: usize) -> usize {
    let local_interrupts = 2;
    let io_interrupts = usize::from(ISA_IRQS) - 1;
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + num_cpus * PROCESSOR_LEN
        + ENTRY_LEN // ISA bus
        + ENTRY_LEN // IOAPIC
        + io_interrupts * ENTRY_LEN
        + local_interrupts * ENTRY_LEN
}

/// Sets byte `at` so that all of `bytes` sums to zero.
fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    bytes[at] = sum.wrapping_neg();
}

/// The IOAPIC ID the MP table uses for `num_cpus` boot CPUs (the first ID after the CPUs').
pub fn ioapic_id(num_cpus: u32) -> u8 {
    u8::try_from(num_cpus).unwrap_or(u8::MAX)
}

/// Builds the configuration table (header and entries) for `num_cpus` CPUs.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut push = |entry: &[u8]| {
        entries.extend_from_slice(entry);
        count += 1;
    };

    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        let mut e = vec![ENTRY_PROCESSOR, id, APIC_VERSION, flags];
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        push(&e);
    }

    let mut bus = vec![ENTRY_BUS, ISA_BUS_ID];
    bus.extend_from_slice(b"ISA   ");
    push(&bus);

    let ioapic = ioapic_id(u32::from(num_cpus));
    let mut e = vec![ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, IOAPIC_ENABLED];
    // IOAPIC_START is below 4 GiB.
    e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    push(&e);

    for irq in 0..ISA_IRQS {
        let pin = match irq {
            TIMER_IRQ => TIMER_PIN,
            // Pin 2 carries the timer; IRQ 2 (the PIC cascade) has no pin of its own.
            TIMER_PIN => continue,
            _ => irq,
        };
        let [f0, f1] = CONFORMING.to_le_bytes();
        push(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            f0,
            f1,
            ISA_BUS_ID,
            irq,
            ioapic,
            pin,
        ]);
    }

    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        let [f0, f1] = CONFORMING.to_le_bytes();
        push(&[
            ENTRY_LOCAL_INTERRUPT,
            int_type,
            f0,
            f1,
            ISA_BUS_ID,
            0,
            ALL_LAPICS,
            lint,
        ]);
    }

    let length = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(length);
    table.extend_from_slice(b"PCMP");
    // Bounded by the EBDA size checked by the caller.
    table.extend_from_slice(&(length as u16).to_le_bytes());
    table.push(SPEC_REV_1_4);
    table.push(0); // checksum
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    // APIC_START is below 4 GiB.
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    fix_checksum(&mut table, 7);
    table
}

fn floating_pointer(config_addr: u32) -> [u8; FLOATING_POINTER_LEN] {
    let mut fp = [0u8; FLOATING_POINTER_LEN];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&config_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV_1_4;
    // fp[11] = 0: the configuration table is present (no default configuration);
    // fp[12] = 0: virtual wire mode, no IMCR.
    fix_checksum(&mut fp, 10);
    fp
}

/// Writes the MP floating pointer at `EBDA_START` and the configuration table right after it:
/// `num_cpus` processors (CPU 0 the bootstrap processor), the ISA bus, the IOAPIC (ID
/// `num_cpus`, at `IOAPIC_START`), ISA IRQs 0-15 routed to IOAPIC pins (IRQ 0 to pin 2) and
/// LINT0 = ExtINT, LINT1 = NMI on every local APIC.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<(), Error> {
    if num_cpus == 0 {
        return Err(Error::NoCpus);
    }
    let space = (EBDA_END - EBDA_START) as usize;
    let max_cpus = (space - table_size(0)) / PROCESSOR_LEN;
    let too_many = || Error::TooManyCpus {
        cpus: num_cpus,
        size: table_size(num_cpus as usize),
        space,
        max_cpus: max_cpus as u32,
    };
    if num_cpus as usize > max_cpus {
        return Err(too_many());
    }
    let cpus = u8::try_from(num_cpus).map_err(|_| too_many())?;

    let config_addr = EBDA_START + FLOATING_POINTER_LEN as u64;
    let table = config_table(cpus);
    // EBDA_START is below 1 MiB.
    let fp = floating_pointer(config_addr as u32);
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .map_err(|_| Error::GuestWrite(EBDA_START))?;
    mem.write_slice(&table, GuestAddress(config_addr))
        .map_err(|_| Error::GuestWrite(config_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Finds the floating pointer and returns the configuration table it points at.
    fn load(mem: &GuestMemoryMmap) -> Vec<u8> {
        let fp = read(mem, 0x9fc00, 16);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!((fp[8], fp[9]), (1, 4));
        let addr = u64::from(u32_at(&fp, 4));
        let header = read(mem, addr, 44);
        assert_eq!(&header[0..4], b"PCMP");
        let table = read(mem, addr, usize::from(u16_at(&header, 4)));
        assert_eq!(sum(&table), 0, "configuration table checksum");
        table
    }

    /// Splits the entries into (type, bytes).
    fn entries(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 44;
        for _ in 0..u16_at(table, 34) {
            let len = if table[at] == 0 { 20 } else { 8 };
            out.push((table[at], table[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, table.len(), "entry count matches the length");
        out
    }

    #[test]
    fn checksums_and_processors() {
        for cpus in [1, 2, 8, 40] {
            let mem = memory();
            setup_mptable(&mem, cpus).unwrap();
            let table = load(&mem);
            assert_eq!(u32_at(&table, 36), 0xfee0_0000);
            let procs: Vec<_> = entries(&table)
                .into_iter()
                .filter(|(t, _)| *t == 0)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(procs.len(), cpus as usize);
            for (i, p) in procs.iter().enumerate() {
                assert_eq!(p[1] as usize, i, "APIC ID");
                let expected = if i == 0 { 3 } else { 1 };
                assert_eq!(p[3], expected, "flags of CPU {i}");
            }
        }
    }

    #[test]
    fn ioapic_and_interrupts() {
        let mem = memory();
        setup_mptable(&mem, 4).unwrap();
        let table = load(&mem);
        let all = entries(&table);
        let of = |t: u8| -> Vec<Vec<u8>> {
            all.iter()
                .filter(|(k, _)| *k == t)
                .map(|(_, e)| e.clone())
                .collect()
        };
        assert_eq!(of(1), vec![b"\x01\x00ISA   ".to_vec()]);
        let ioapics = of(2);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][1], 4, "IOAPIC ID = num_cpus");
        assert_eq!(ioapics[0][1], ioapic_id(4));
        assert_eq!(ioapics[0][3], 1, "enabled");
        assert_eq!(u32_at(&ioapics[0], 4), 0xfec0_0000);

        let routes: Vec<(u8, u8)> = of(3).iter().map(|e| (e[5], e[7])).collect();
        assert_eq!(routes.len(), 15);
        assert!(routes.contains(&(0, 2)));
        assert!(!routes.iter().any(|(irq, _)| *irq == 2));
        for irq in (1..16).filter(|i| *i != 2) {
            assert!(routes.contains(&(irq, irq)), "IRQ {irq}");
        }
        assert!(of(3).iter().all(|e| e[1] == 0 && e[6] == 4));

        let lints: Vec<(u8, u8, u8)> = of(4).iter().map(|e| (e[1], e[6], e[7])).collect();
        assert_eq!(lints, vec![(3, 0xff, 0), (1, 0xff, 1)]);
    }

    #[test]
    fn limits() {
        let mem = memory();
        assert!(matches!(setup_mptable(&mem, 0), Err(Error::NoCpus)));
        let err = setup_mptable(&mem, 41).unwrap_err();
        assert!(
            matches!(err, Error::TooManyCpus { max_cpus: 40, .. }),
            "{err}"
        );
        assert!(matches!(
            setup_mptable(&mem, u32::MAX),
            Err(Error::TooManyCpus { .. })
        ));
        let high: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        assert!(matches!(
            setup_mptable(&high, 1),
            Err(Error::GuestWrite(0x9fc00))
        ));
    }

    #[test]
    fn fits_exactly_in_the_ebda() {
        assert!(table_size(40) <= 0x400);
        assert!(table_size(41) > 0x400);
    }
}
