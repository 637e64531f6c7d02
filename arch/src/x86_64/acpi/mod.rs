//! ACPI tables: RSDP (revision 2) at `RSDP_POINTER`, then XSDT, FADT, DSDT, MADT and MCFG
//! packed after it on 16-byte boundaries, all inside `RSDP_POINTER..ACPI_TABLES_END`.
//!
//! The XSDT lists the FADT, MADT and MCFG; the FADT points at the DSDT through `X_DSDT`. The
//! DSDT describes the PCI host bridge of segment 0 with its windows, interrupt routing and
//! hotplug slots, the processors, the memory hotplug slots, the power button and the Generic
//! Event Device through which the VMM signals hotplug and the power button (their register
//! blocks are in [`layout`](super::layout)); the MCFG gives the ECAM area. The tables are built
//! with their final addresses, so [`tables`] returns exactly what [`create_acpi_tables`] writes.

mod cpu_hotplug;
mod dsdt;
mod encoded;
mod ged;
mod hotplug;
mod memory_hotplug;
mod pci;
mod pci_hotplug;
mod tables;

use acpi_tables::fadt::FADT;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{pci_mmio64_window, ACPI_TABLES_END, RSDP_POINTER};
use super::mptable;

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"ATRIUM";
const OEM_REVISION: u32 = 1;
/// Tables start on 16-byte boundaries.
const TABLE_ALIGN: u64 = 16;
/// Size of the common ACPI table header.
const HEADER_LEN: u64 = 36;
/// The XSDT lists the FADT, the MADT and the MCFG.
const XSDT_ENTRIES: u64 = 3;
/// APIC IDs 0..=254 fit the MADT's 8-bit local APIC entries (0xff is the broadcast ID).
const MAX_CPUS: u32 = 255;
/// Most memory hotplug slots the DSDT describes (device names `M000`..`M0FF`).
pub const MAX_MEMORY_SLOTS: u32 = 256;
const _: () = assert!(MAX_MEMORY_SLOTS <= hotplug::MAX_SLOTS);

/// OEM table ID: "ATRM" followed by the table's signature.
fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"ATRM____";
    id[4..].copy_from_slice(signature);
    id
}

/// Errors from building or writing the ACPI tables.
#[derive(Debug, Error)]
pub enum Error {
    /// The CPU counts are inconsistent or too large.
    #[error("ACPI needs 1 <= boot vCPUs ({boot}) <= max vCPUs ({max}) <= {MAX_CPUS}; fix the vCPU configuration")]
    CpuCount {
        /// Boot vCPUs asked for.
        boot: u32,
        /// Maximum vCPUs asked for.
        max: u32,
    },
    /// More memory hotplug slots than the DSDT can describe.
    #[error("{slots} memory hotplug slots asked for, at most {MAX_MEMORY_SLOTS} are supported; use fewer slots")]
    MemorySlots {
        /// Slots asked for.
        slots: u32,
    },
    /// The PCI 64-bit MMIO window above this much RAM would pass the end of the address space.
    #[error("no room for the PCI 64-bit MMIO window above {ram_size:#x} bytes of guest RAM; give the guest less memory")]
    NoPciMmio64Window {
        /// Guest RAM size in bytes.
        ram_size: u64,
    },
    /// The tables do not fit below `ACPI_TABLES_END`.
    #[error("the ACPI tables would end at {end:#x}, past {ACPI_TABLES_END:#x}; use fewer vCPUs or memory hotplug slots")]
    TooLarge {
        /// Where the last table would end.
        end: u64,
    },
    /// A table could not be written into guest memory.
    #[error("cannot write the ACPI {table} at {addr:#x} into guest memory; give the guest at least 1 MiB of RAM")]
    GuestWrite {
        /// Signature of the table.
        table: &'static str,
        /// Its guest address.
        addr: u64,
    },
}

/// One table at its guest address.
struct Placed {
    signature: &'static str,
    addr: u64,
    bytes: Vec<u8>,
}

fn align(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Where `build` puts the tables: the RSDP at `rsdp`, the others packed from `first_table`, all ending by `end`.
#[derive(Clone, Copy)]
struct Placement {
    rsdp: u64,
    first_table: u64,
    end: u64,
}

/// Length of the revision-2 RSDP.
const RSDP_LEN: u64 = 36;

/// The layout of tables written straight into guest memory.
const IN_MEMORY: Placement = Placement {
    rsdp: RSDP_POINTER,
    first_table: RSDP_POINTER + RSDP_LEN,
    end: ACPI_TABLES_END,
};

/// Builds all tables at their final addresses, RSDP first.
fn build(
    boot_cpus: u32,
    max_cpus: u32,
    ram_size: u64,
    memory_slots: u32,
    at: Placement,
) -> Result<Vec<Placed>, Error> {
    let cpu_error = || Error::CpuCount {
        boot: boot_cpus,
        max: max_cpus,
    };
    if boot_cpus == 0 || boot_cpus > max_cpus || max_cpus > MAX_CPUS {
        return Err(cpu_error());
    }
    let boot = u8::try_from(boot_cpus).map_err(|_| cpu_error())?;
    let max = u8::try_from(max_cpus).map_err(|_| cpu_error())?;
    if memory_slots > MAX_MEMORY_SLOTS {
        return Err(Error::MemorySlots {
            slots: memory_slots,
        });
    }

    let mmio64 = pci_mmio64_window(ram_size);
    if mmio64.1 == 0 || mmio64.0.checked_add(mmio64.1).is_none() {
        return Err(Error::NoPciMmio64Window { ram_size });
    }

    let dsdt = dsdt::dsdt(mmio64, max, memory_slots);
    let mcfg = tables::mcfg();
    // The same IOAPIC ID as the MP table, which lists the boot CPUs.
    let madt = tables::madt(boot, max, mptable::ioapic_id(boot_cpus));

    let rsdp_addr = at.rsdp;
    let xsdt_addr = align(at.first_table);
    let fadt_addr = align(xsdt_addr + HEADER_LEN + 8 * XSDT_ENTRIES);
    let dsdt_addr = align(fadt_addr + FADT::len() as u64);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let end = mcfg_addr + mcfg.len() as u64;
    if end > at.end {
        return Err(Error::TooLarge { end });
    }

    let fadt = tables::fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    Ok(vec![
        Placed {
            signature: "RSDP",
            addr: rsdp_addr,
            bytes: rsdp_bytes,
        },
        Placed {
            signature: "XSDT",
            addr: xsdt_addr,
            bytes: xsdt_bytes,
        },
        Placed {
            signature: "FACP",
            addr: fadt_addr,
            bytes: fadt,
        },
        Placed {
            signature: "DSDT",
            addr: dsdt_addr,
            bytes: dsdt,
        },
        Placed {
            signature: "APIC",
            addr: madt_addr,
            bytes: madt,
        },
        Placed {
            signature: "MCFG",
            addr: mcfg_addr,
            bytes: mcfg,
        },
    ])
}

/// The tables as bytes, each with its signature ("RSDP" for the root pointer, then "XSDT",
/// "FACP", "DSDT", "APIC", "MCFG"), laid out for the addresses [`create_acpi_tables`] uses
/// with the same arguments.
pub fn tables(
    boot_cpus: u32,
    max_cpus: u32,
    ram_size: u64,
    memory_slots: u32,
) -> Result<Vec<(String, Vec<u8>)>, Error> {
    Ok(
        build(boot_cpus, max_cpus, ram_size, memory_slots, IN_MEMORY)?
            .into_iter()
            .map(|t| (t.signature.to_string(), t.bytes))
            .collect(),
    )
}

/// Writes the RSDP, XSDT, FADT, DSDT, MADT and MCFG into guest memory and returns the RSDP's
/// address.
///
/// The tables describe `boot_cpus` enabled and `max_cpus` possible vCPUs (APIC IDs
/// `0..max_cpus`; the CPU hotplug controller reports which are present), `ram_size` bytes of
/// guest RAM (which places the PCI 64-bit MMIO window, see [`pci_mmio64_window`]) and
/// `memory_slots` memory hotplug slots (at most [`MAX_MEMORY_SLOTS`]; 0 without memory
/// hotplug), each a memory device whose range the memory hotplug controller reports.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    boot_cpus: u32,
    max_cpus: u32,
    ram_size: u64,
    memory_slots: u32,
) -> Result<GuestAddress, Error> {
    let placed = build(boot_cpus, max_cpus, ram_size, memory_slots, IN_MEMORY)?;
    for table in &placed {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|_| Error::GuestWrite {
                table: table.signature,
                addr: table.addr,
            })?;
    }
    Ok(GuestAddress(RSDP_POINTER))
}

/// A pointer inside a [`LoaderTables`] blob that firmware must relocate: `size` bytes at `offset` hold an offset
/// into the tables blob, to which firmware adds the address where it placed that blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderPointer {
    /// Byte offset of the pointer in its blob.
    pub offset: u32,
    /// Pointer width in bytes (4 or 8).
    pub size: u8,
}

/// A table checksum firmware must recompute after relocating pointers: the byte at `offset` makes
/// `start..start + length` sum to zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderChecksum {
    /// Byte offset of the checksum byte.
    pub offset: u32,
    /// First byte covered.
    pub start: u32,
    /// Bytes covered.
    pub length: u32,
}

/// The tables in the form firmware installs them (QEMU's ACPI linker/loader, which SeaBIOS and OVMF implement): the
/// RSDP alone in one blob, every other table packed in a second blob starting at offset 0, and every pointer holding
/// the offset of its target within the tables blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderTables {
    /// XSDT, FADT, DSDT, MADT and MCFG, 16-byte aligned, back to back.
    pub tables: Vec<u8>,
    /// The RSDP (revision 2, 36 bytes).
    pub rsdp: Vec<u8>,
    /// Pointers in `tables` into `tables` (the XSDT entries and the FADT's `X_DSDT`).
    pub table_pointers: Vec<LoaderPointer>,
    /// Pointers in `rsdp` into `tables` (the XSDT address).
    pub rsdp_pointers: Vec<LoaderPointer>,
    /// Checksums in `tables`, one per table.
    pub table_checksums: Vec<LoaderChecksum>,
    /// Checksums in `rsdp`: the 20-byte one first, then the extended one that covers it.
    pub rsdp_checksums: Vec<LoaderChecksum>,
}

/// Offset of the XSDT address in the RSDP.
const RSDP_XSDT_OFFSET: u32 = 24;
/// Offset of the 20-byte checksum in the RSDP.
const RSDP_CHECKSUM_OFFSET: u32 = 8;
/// Offset of the extended checksum in the RSDP.
const RSDP_EXT_CHECKSUM_OFFSET: u32 = 32;
/// Offset of the checksum byte in a table header.
const HEADER_CHECKSUM_OFFSET: u32 = 9;
/// Offset of `X_DSDT` in the FADT.
const FADT_X_DSDT_OFFSET: u32 = 140;

/// Builds the same tables as [`create_acpi_tables`] for firmware to install through fw_cfg (see [`LoaderTables`]).
pub fn loader_tables(
    boot_cpus: u32,
    max_cpus: u32,
    ram_size: u64,
    memory_slots: u32,
) -> Result<LoaderTables, Error> {
    let at = Placement {
        rsdp: 0,
        first_table: 0,
        end: u64::from(u32::MAX),
    };
    let placed = build(boot_cpus, max_cpus, ram_size, memory_slots, at)?;
    let mut out = LoaderTables {
        tables: Vec::new(),
        rsdp: Vec::new(),
        table_pointers: Vec::new(),
        rsdp_pointers: vec![LoaderPointer {
            offset: RSDP_XSDT_OFFSET,
            size: 8,
        }],
        table_checksums: Vec::new(),
        rsdp_checksums: vec![
            LoaderChecksum {
                offset: RSDP_CHECKSUM_OFFSET,
                start: 0,
                length: 20,
            },
            LoaderChecksum {
                offset: RSDP_EXT_CHECKSUM_OFFSET,
                start: 0,
                length: Rsdp::len() as u32,
            },
        ],
    };
    // `end` above keeps every offset below 4 GiB, so the narrowing casts below are lossless.
    for table in placed {
        if table.signature == "RSDP" {
            out.rsdp = table.bytes;
            continue;
        }
        let start = table.addr as u32;
        out.tables.resize(table.addr as usize, 0);
        match table.signature {
            "XSDT" => {
                let entries = (table.bytes.len() as u32 - HEADER_LEN as u32) / 8;
                out.table_pointers
                    .extend((0..entries).map(|i| LoaderPointer {
                        offset: start + HEADER_LEN as u32 + 8 * i,
                        size: 8,
                    }));
            }
            "FACP" => out.table_pointers.push(LoaderPointer {
                offset: start + FADT_X_DSDT_OFFSET,
                size: 8,
            }),
            _ => {}
        }
        out.table_checksums.push(LoaderChecksum {
            offset: start + HEADER_CHECKSUM_OFFSET,
            start,
            length: table.bytes.len() as u32,
        });
        out.tables.extend_from_slice(&table.bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Guest RAM size the tables are built for (the test memory itself is smaller).
    const RAM: u64 = 512 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
    }

    /// Reads a whole table at `addr` (using its header length) and checks its checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        assert!((0xe0000..0x10_0000).contains(&addr), "table at {addr:#x}");
        assert_eq!(addr % 16, 0, "table at {addr:#x} is aligned");
        let header = read(mem, addr, 36);
        let table = read(mem, addr, u32_at(&header, 4) as usize);
        assert!(addr + table.len() as u64 <= 0x10_0000);
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[0..4]);
        table
    }

    /// Follows RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG} in guest memory, checking every
    /// checksum.
    fn walk(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Vec<(u64, Vec<u8>)> {
        let r = read(mem, rsdp.0, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(&r[9..15], b"ATRIUM");
        assert_eq!(u32_at(&r, 20), 36, "length");
        let xsdt_addr = u64_at(&r, 24);

        let xsdt = read_table(mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        let mut found = vec![(xsdt_addr, xsdt.clone())];
        for i in 0..(xsdt.len() - 36) / 8 {
            let addr = u64_at(&xsdt, 36 + 8 * i);
            let table = read_table(mem, addr);
            if &table[0..4] == b"FACP" {
                let dsdt_addr = u64_at(&table, 140);
                let dsdt = read_table(mem, dsdt_addr);
                assert_eq!(&dsdt[0..4], b"DSDT");
                found.push((dsdt_addr, dsdt));
            }
            found.push((addr, table));
        }
        found
    }

    /// Does what firmware does with [`loader_tables`]: adds `base` to every pointer, then fixes every checksum the
    /// way SeaBIOS does (subtracting the range's sum from the checksum byte).
    fn relocate(
        blob: &mut [u8],
        pointers: &[LoaderPointer],
        checksums: &[LoaderChecksum],
        base: u64,
    ) {
        for p in pointers {
            let at = p.offset as usize;
            let size = usize::from(p.size);
            let mut raw = [0u8; 8];
            raw[..size].copy_from_slice(&blob[at..at + size]);
            let value = u64::from_le_bytes(raw) + base;
            blob[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
        }
        for c in checksums {
            let range = c.start as usize..(c.start + c.length) as usize;
            let s = sum(&blob[range]);
            blob[c.offset as usize] = blob[c.offset as usize].wrapping_sub(s);
        }
    }

    #[test]
    fn loader_tables_relocated_to_the_in_memory_addresses_equal_the_in_memory_tables() {
        assert_eq!(Rsdp::len() as u64, RSDP_LEN);
        let loader = loader_tables(2, 4, RAM, 3).unwrap();
        let mem = memory();
        create_acpi_tables(&mem, 2, 4, RAM, 3).unwrap();
        // In memory the first table follows the RSDP on a 16-byte boundary; in the blob it is at offset 0.
        let base = align(RSDP_POINTER + Rsdp::len() as u64);
        let (mut tables, mut rsdp) = (loader.tables.clone(), loader.rsdp.clone());
        relocate(
            &mut tables,
            &loader.table_pointers,
            &loader.table_checksums,
            base,
        );
        relocate(
            &mut rsdp,
            &loader.rsdp_pointers,
            &loader.rsdp_checksums,
            base,
        );
        assert_eq!(rsdp, read(&mem, RSDP_POINTER, rsdp.len()));
        assert_eq!(tables, read(&mem, base, tables.len()));
        // Three XSDT entries and X_DSDT; one checksum per table (XSDT, FADT, DSDT, MADT, MCFG).
        assert_eq!(loader.table_pointers.len(), 4);
        assert_eq!(loader.table_checksums.len(), 5);
        assert_eq!(loader.rsdp_pointers.len(), 1);
        // Unrelocated, the pointers hold offsets inside the tables blob.
        assert_eq!(u64_at(&loader.rsdp, 24), 0);
        assert_eq!(&loader.tables[0..4], b"XSDT");
    }

    #[test]
    fn walk_from_the_rsdp() {
        let mem = memory();
        let rsdp = create_acpi_tables(&mem, 2, 8, RAM, 4).unwrap();
        assert_eq!(rsdp, GuestAddress(0xe0000));
        let found = walk(&mem, rsdp);
        let mut signatures: Vec<&[u8]> = found.iter().map(|(_, t)| &t[0..4]).collect();
        signatures.sort();
        assert_eq!(signatures, [b"APIC", b"DSDT", b"FACP", b"MCFG", b"XSDT"]);

        // No two tables overlap.
        let mut ranges: Vec<(u64, u64)> = found
            .iter()
            .map(|(a, t)| (*a, *a + t.len() as u64))
            .collect();
        ranges.push((0xe0000, 0xe0000 + 36));
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:?}");
        }

        let madt = &found.iter().find(|(_, t)| &t[0..4] == b"APIC").unwrap().1;
        let lapics = madt[44..].chunks(8).take_while(|e| e[0] == 0).count();
        assert_eq!(lapics, 8);

        let mcfg = &found.iter().find(|(_, t)| &t[0..4] == b"MCFG").unwrap().1;
        assert_eq!(u64_at(mcfg, 44), 0xe000_0000, "ECAM base");
    }

    #[test]
    fn largest_tables_fit_the_acpi_area() {
        let built = tables(255, 255, 1 << 40, MAX_MEMORY_SLOTS).unwrap();
        let mut end = 0xe0000u64;
        for (_, bytes) in &built {
            end = end.div_ceil(16) * 16 + bytes.len() as u64;
        }
        assert!(end <= 0x10_0000, "tables end at {end:#x}");
        // Written through the same placement: the walk checks every table's bounds.
        let mem = memory();
        let rsdp = create_acpi_tables(&mem, 255, 255, 1 << 40, MAX_MEMORY_SLOTS).unwrap();
        assert_eq!(walk(&mem, rsdp).len(), 5, "XSDT, FACP, DSDT, APIC, MCFG");
    }

    #[test]
    fn dsdt_follows_the_ram_size() {
        let dsdt = |ram: u64| {
            let built = tables(1, 1, ram, 0).unwrap();
            built.into_iter().find(|(n, _)| n == "DSDT").unwrap().1
        };
        // A QWordMemory descriptor (cacheable, read-write, zero granularity) starting there.
        let contains = |t: &[u8], start: u64| {
            let head = [0x8a, 0x2b, 0, 0, 0x0c, 0x03, 0, 0, 0, 0, 0, 0, 0, 0];
            let descriptor = [&head[..], &start.to_le_bytes()].concat();
            t.windows(descriptor.len()).any(|w| w == descriptor)
        };
        assert!(contains(&dsdt(RAM), 4 << 30));
        assert!(contains(&dsdt(6 << 30), 7 << 30));
        assert!(!contains(&dsdt(6 << 30), 4 << 30));
    }

    #[test]
    fn ram_too_large_for_the_mmio64_window() {
        assert!(matches!(
            tables(1, 1, u64::MAX, 0),
            Err(Error::NoPciMmio64Window { ram_size: u64::MAX })
        ));
        let mem = memory();
        assert!(matches!(
            create_acpi_tables(&mem, 1, 1, u64::MAX - (1 << 30), 0),
            Err(Error::NoPciMmio64Window { .. })
        ));
    }

    #[test]
    fn tables_match_what_is_written() {
        let mem = memory();
        create_acpi_tables(&mem, 1, 1, RAM, 0).unwrap();
        let built = tables(1, 1, RAM, 0).unwrap();
        let names: Vec<&str> = built.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"]);
        let found = walk(&mem, GuestAddress(0xe0000));
        for (name, bytes) in &built[1..] {
            let (_, in_memory) = found
                .iter()
                .find(|(_, t)| &t[0..4] == name.as_bytes())
                .unwrap();
            assert_eq!(in_memory, bytes, "{name}");
        }
        assert_eq!(read(&mem, 0xe0000, 36), built[0].1);
    }

    #[test]
    fn madt_ioapic_matches_the_mp_table() {
        let built = tables(3, 8, RAM, 0).unwrap();
        let madt = &built.iter().find(|(n, _)| n == "APIC").unwrap().1;
        let mut at = 44;
        let mut ioapic_id = None;
        while at < madt.len() {
            if madt[at] == 1 {
                ioapic_id = Some(madt[at + 2]);
            }
            at += usize::from(madt[at + 1]);
        }
        assert_eq!(ioapic_id, Some(mptable::ioapic_id(3)));
    }

    #[test]
    fn every_table_sums_to_zero() {
        for (boot, max) in [(1, 1), (2, 8), (8, 8), (1, 255), (255, 255)] {
            for (name, bytes) in tables(boot, max, RAM, 0).unwrap() {
                let len = if name == "RSDP" {
                    assert_eq!(sum(&bytes[0..20]), 0);
                    36
                } else {
                    u32_at(&bytes, 4) as usize
                };
                assert_eq!(len, bytes.len(), "{name}");
                assert_eq!(sum(&bytes), 0, "{name} for {boot}/{max}");
            }
        }
    }

    #[test]
    fn bad_cpu_counts() {
        for (boot, max) in [(0, 1), (2, 1), (1, 256), (300, 300)] {
            assert!(matches!(
                tables(boot, max, RAM, 0),
                Err(Error::CpuCount { .. })
            ));
        }
        let mem = memory();
        assert!(matches!(
            create_acpi_tables(&mem, 0, 0, RAM, 0),
            Err(Error::CpuCount { .. })
        ));
    }

    #[test]
    fn memory_slots_limit() {
        assert!(tables(1, 1, RAM, MAX_MEMORY_SLOTS).is_ok());
        assert!(matches!(
            tables(1, 1, RAM, MAX_MEMORY_SLOTS + 1),
            Err(Error::MemorySlots { slots: 257 })
        ));
        let mem = memory();
        assert!(matches!(
            create_acpi_tables(&mem, 1, 1, RAM, u32::MAX),
            Err(Error::MemorySlots { .. })
        ));
    }

    #[test]
    fn memory_without_the_acpi_area() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9fc00)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, 1, 1, RAM, 0),
            Err(Error::GuestWrite {
                table: "RSDP",
                addr: 0xe0000
            })
        ));
    }
}
