//! The ACPI linker/loader: how firmware places the VMM's ACPI tables in guest memory.
//!
//! The VMM builds its tables as two blobs, `etc/acpi/tables` (every table, back to back) and `etc/acpi/rsdp`, in
//! which every pointer holds the offset of its target inside the target blob. The script `etc/table-loader` tells
//! firmware to allocate both blobs (the RSDP in the F segment, where the OS searches for it; the tables anywhere in
//! 32-bit memory), add each blob's final address to the pointers into it, and then compute the checksums.
//!
//! The script is a sequence of 128-byte entries, all integers little-endian, names NUL-padded to 56 bytes:
//!
//! | command | layout after the le32 command |
//! |---|---|
//! | 1 ALLOCATE | name, le32 alignment, u8 zone (1 high, 2 F segment) |
//! | 2 ADD_POINTER | destination name, source name, le32 offset in the destination, u8 pointer size |
//! | 3 ADD_CHECKSUM | name, le32 offset of the checksum byte, le32 start, le32 length |
//!
//! Checksums are written after all pointers are patched, in the order they were added (so the RSDP's 20-byte
//! checksum can come before its extended checksum, which covers it). Each checksum byte is zeroed when it is
//! added: SeaBIOS subtracts the sum of the range from the byte, while OVMF overwrites the byte with the value that
//! makes the range sum to zero counting the byte itself, and only a zero byte gives both the same result.

use super::{check_size, FwCfg, FwCfgError, FILE_NAME_FIELD};

/// File name of the loader script.
pub const FILE_TABLE_LOADER: &str = "etc/table-loader";
/// File name of the ACPI tables blob.
pub const FILE_ACPI_TABLES: &str = "etc/acpi/tables";
/// File name of the RSDP blob.
pub const FILE_ACPI_RSDP: &str = "etc/acpi/rsdp";

/// Bytes of one loader command.
pub const LOADER_ENTRY_LEN: usize = 128;

const COMMAND_ALLOCATE: u32 = 1;
const COMMAND_ADD_POINTER: u32 = 2;
const COMMAND_ADD_CHECKSUM: u32 = 3;
/// Allocation zone: anywhere in 32-bit memory.
const ZONE_HIGH: u8 = 1;
/// Allocation zone: the F segment (0xf0000..0x100000).
const ZONE_FSEG: u8 = 2;
/// Alignment of the tables blob.
const TABLES_ALIGN: u32 = 64;
/// Alignment of the RSDP (the OS scans on 16-byte boundaries).
const RSDP_ALIGN: u32 = 16;

/// One of the two blobs the loader places.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiBlob {
    /// `etc/acpi/tables`.
    Tables,
    /// `etc/acpi/rsdp`.
    Rsdp,
}

impl AcpiBlob {
    /// The blob's fw_cfg file name.
    pub fn file_name(self) -> &'static str {
        match self {
            AcpiBlob::Tables => FILE_ACPI_TABLES,
            AcpiBlob::Rsdp => FILE_ACPI_RSDP,
        }
    }
}

/// A pointer to patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pointer {
    dest: AcpiBlob,
    offset: u32,
    size: u8,
    target: AcpiBlob,
}

/// A checksum to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Checksum {
    blob: AcpiBlob,
    offset: u32,
    start: u32,
    length: u32,
}

/// Builds the three files of the ACPI linker/loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiLoader {
    tables: Vec<u8>,
    rsdp: Vec<u8>,
    pointers: Vec<Pointer>,
    checksums: Vec<Checksum>,
}

impl AcpiLoader {
    /// Starts a loader for the `tables` and `rsdp` blobs; neither may be empty.
    pub fn new(tables: Vec<u8>, rsdp: Vec<u8>) -> Result<Self, FwCfgError> {
        if tables.is_empty() || rsdp.is_empty() {
            return Err(invalid(
                "the ACPI tables and RSDP blobs must not be empty; build the tables first"
                    .to_owned(),
            ));
        }
        check_size(&tables)?;
        check_size(&rsdp)?;
        Ok(AcpiLoader {
            tables,
            rsdp,
            pointers: Vec::new(),
            checksums: Vec::new(),
        })
    }

    fn blob(&self, blob: AcpiBlob) -> &[u8] {
        match blob {
            AcpiBlob::Tables => &self.tables,
            AcpiBlob::Rsdp => &self.rsdp,
        }
    }

    fn blob_mut(&mut self, blob: AcpiBlob) -> &mut Vec<u8> {
        match blob {
            AcpiBlob::Tables => &mut self.tables,
            AcpiBlob::Rsdp => &mut self.rsdp,
        }
    }

    /// Asks firmware to add the address of `target` to the `size`-byte little-endian pointer at `offset` in `dest`.
    ///
    /// The pointer must already hold an offset inside `target`; `size` is 1, 2, 4 or 8.
    pub fn add_pointer(
        &mut self,
        dest: AcpiBlob,
        offset: u32,
        size: u8,
        target: AcpiBlob,
    ) -> Result<(), FwCfgError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(invalid(format!(
                "ACPI pointer size {size} is not supported; use 1, 2, 4 or 8 bytes"
            )));
        }
        let start = offset as usize;
        let field = self
            .blob(dest)
            .get(start..start + usize::from(size))
            .ok_or_else(|| {
                invalid(format!(
                    "ACPI pointer at {}+{offset:#x} ({size} bytes) runs past the end of the blob; fix the offset",
                    dest.file_name()
                ))
            })?;
        let mut value = [0u8; 8];
        value[..field.len()].copy_from_slice(field);
        let value = u64::from_le_bytes(value);
        let target_len = self.blob(target).len() as u64;
        if value >= target_len {
            return Err(invalid(format!(
                "ACPI pointer at {}+{offset:#x} holds {value:#x}, outside {} ({target_len:#x} bytes); store the \
                 target's offset in the blob",
                dest.file_name(),
                target.file_name()
            )));
        }
        self.pointers.push(Pointer {
            dest,
            offset,
            size,
            target,
        });
        Ok(())
    }

    /// Asks firmware to set the byte at `offset` in `blob` so that `[start, start + length)` sums to zero.
    ///
    /// The byte must lie inside the range; it is zeroed now (see the module documentation).
    pub fn add_checksum(
        &mut self,
        blob: AcpiBlob,
        offset: u32,
        start: u32,
        length: u32,
    ) -> Result<(), FwCfgError> {
        let end = u64::from(start) + u64::from(length);
        let blob_len = self.blob(blob).len() as u64;
        let inside = length > 0 && end <= blob_len && offset >= start && u64::from(offset) < end;
        if !inside {
            return Err(invalid(format!(
                "ACPI checksum at {}+{offset:#x} over {start:#x}+{length:#x} does not fit: the range must be \
                 non-empty, inside the {blob_len:#x}-byte blob and hold the checksum byte",
                blob.file_name()
            )));
        }
        self.blob_mut(blob)[offset as usize] = 0;
        self.checksums.push(Checksum {
            blob,
            offset,
            start,
            length,
        });
        Ok(())
    }

    /// The tables blob as it will be served (checksum bytes zeroed).
    pub fn tables(&self) -> &[u8] {
        &self.tables
    }

    /// The RSDP blob as it will be served (checksum bytes zeroed).
    pub fn rsdp(&self) -> &[u8] {
        &self.rsdp
    }

    /// The `etc/table-loader` script: allocate both blobs, patch the pointers, then compute the checksums.
    pub fn script(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity((2 + self.pointers.len() + self.checksums.len()) * LOADER_ENTRY_LEN);
        out.extend_from_slice(&allocate(AcpiBlob::Tables, TABLES_ALIGN, ZONE_HIGH));
        out.extend_from_slice(&allocate(AcpiBlob::Rsdp, RSDP_ALIGN, ZONE_FSEG));
        for p in &self.pointers {
            let mut e = entry(COMMAND_ADD_POINTER);
            put_name(&mut e, 4, p.dest);
            put_name(&mut e, 4 + FILE_NAME_FIELD, p.target);
            e[116..120].copy_from_slice(&p.offset.to_le_bytes());
            e[120] = p.size;
            out.extend_from_slice(&e);
        }
        for c in &self.checksums {
            let mut e = entry(COMMAND_ADD_CHECKSUM);
            put_name(&mut e, 4, c.blob);
            e[60..64].copy_from_slice(&c.offset.to_le_bytes());
            e[64..68].copy_from_slice(&c.start.to_le_bytes());
            e[68..72].copy_from_slice(&c.length.to_le_bytes());
            out.extend_from_slice(&e);
        }
        out
    }
}

/// A zeroed entry with its command set.
fn entry(command: u32) -> [u8; LOADER_ENTRY_LEN] {
    let mut e = [0u8; LOADER_ENTRY_LEN];
    e[..4].copy_from_slice(&command.to_le_bytes());
    e
}

/// An ALLOCATE entry.
fn allocate(blob: AcpiBlob, align: u32, zone: u8) -> [u8; LOADER_ENTRY_LEN] {
    let mut e = entry(COMMAND_ALLOCATE);
    put_name(&mut e, 4, blob);
    e[60..64].copy_from_slice(&align.to_le_bytes());
    e[64] = zone;
    e
}

/// Stores a blob's name, NUL-padded, in the 56-byte field at `at`.
fn put_name(e: &mut [u8; LOADER_ENTRY_LEN], at: usize, blob: AcpiBlob) {
    let name = blob.file_name().as_bytes();
    e[at..at + name.len()].copy_from_slice(name);
}

fn invalid(message: String) -> FwCfgError {
    FwCfgError::InvalidFile(message)
}

impl FwCfg {
    /// Adds `etc/acpi/tables`, `etc/acpi/rsdp` and the `etc/table-loader` script that links them.
    pub fn add_acpi(&mut self, loader: &AcpiLoader) -> Result<(), FwCfgError> {
        for name in [FILE_ACPI_TABLES, FILE_ACPI_RSDP, FILE_TABLE_LOADER] {
            if self.file_key(name).is_some() {
                return Err(FwCfgError::DuplicateFile {
                    name: name.to_owned(),
                });
            }
        }
        self.add_file(FILE_ACPI_TABLES, loader.tables.clone())?;
        self.add_file(FILE_ACPI_RSDP, loader.rsdp.clone())?;
        self.add_file(FILE_TABLE_LOADER, loader.script())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    /// A toy layout: a 36-byte RSDP whose XSDT pointer (offset 24, 8 bytes) and RSDT pointer (offset 16, 4 bytes)
    /// point into a 64-byte tables blob at offset 0x10.
    fn loader() -> AcpiLoader {
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[8] = 0x77; // a stale checksum the builder must clear
        rsdp[16] = 0x10;
        rsdp[24] = 0x10;
        let mut tables = vec![0u8; 64];
        tables[0x10..0x14].copy_from_slice(b"XSDT");
        let mut l = AcpiLoader::new(tables, rsdp).unwrap();
        l.add_pointer(AcpiBlob::Rsdp, 16, 4, AcpiBlob::Tables)
            .unwrap();
        l.add_pointer(AcpiBlob::Rsdp, 24, 8, AcpiBlob::Tables)
            .unwrap();
        l.add_checksum(AcpiBlob::Rsdp, 8, 0, 20).unwrap();
        l.add_checksum(AcpiBlob::Rsdp, 32, 0, 36).unwrap();
        l
    }

    fn name_field(e: &[u8], at: usize) -> &str {
        let field = &e[at..at + FILE_NAME_FIELD];
        assert_eq!(field[FILE_NAME_FIELD - 1], 0);
        let end = field.iter().position(|&b| b == 0).unwrap();
        assert!(field[end..].iter().all(|&b| b == 0), "NUL padding");
        std::str::from_utf8(&field[..end]).unwrap()
    }

    fn le32(e: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(e[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn script_byte_layout() {
        let l = loader();
        let script = l.script();
        assert_eq!(script.len(), 6 * LOADER_ENTRY_LEN);
        let e: Vec<&[u8]> = script.chunks(LOADER_ENTRY_LEN).collect();

        // ALLOCATE tables: high zone, 64-byte aligned; then the RSDP in the F segment, 16-byte aligned.
        assert_eq!(le32(e[0], 0), 1);
        assert_eq!(name_field(e[0], 4), "etc/acpi/tables");
        assert_eq!(le32(e[0], 60), 64);
        assert_eq!(e[0][64], 1);
        assert_eq!(le32(e[1], 0), 1);
        assert_eq!(name_field(e[1], 4), "etc/acpi/rsdp");
        assert_eq!(le32(e[1], 60), 16);
        assert_eq!(e[1][64], 2);
        assert!(e[1][65..].iter().all(|&b| b == 0));

        // ADD_POINTER: dest, src, offset, size.
        assert_eq!(le32(e[2], 0), 2);
        assert_eq!(name_field(e[2], 4), "etc/acpi/rsdp");
        assert_eq!(name_field(e[2], 60), "etc/acpi/tables");
        assert_eq!(le32(e[2], 116), 16);
        assert_eq!(e[2][120], 4);
        assert_eq!((le32(e[3], 116), e[3][120]), (24, 8));
        assert!(e[3][121..].iter().all(|&b| b == 0));

        // ADD_CHECKSUM: file, offset, start, length, in the order added.
        assert_eq!(le32(e[4], 0), 3);
        assert_eq!(name_field(e[4], 4), "etc/acpi/rsdp");
        assert_eq!((le32(e[4], 60), le32(e[4], 64), le32(e[4], 68)), (8, 0, 20));
        assert_eq!(
            (le32(e[5], 60), le32(e[5], 64), le32(e[5], 68)),
            (32, 0, 36)
        );
        assert!(e[5][72..].iter().all(|&b| b == 0));

        assert_eq!(l.rsdp()[8], 0, "checksum byte zeroed");
    }

    /// Runs the script the way firmware does, with the blobs at `tables_at` and `rsdp_at`.
    fn execute(l: &AcpiLoader, tables_at: u64, rsdp_at: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut tables, mut rsdp) = (l.tables().to_vec(), l.rsdp().to_vec());
        for e in l.script().chunks(LOADER_ENTRY_LEN) {
            let which = |at| match name_field(e, at) {
                "etc/acpi/tables" => 0,
                _ => 1,
            };
            match le32(e, 0) {
                2 => {
                    let base = [tables_at, rsdp_at][which(60)];
                    let blob = if which(4) == 0 {
                        &mut tables
                    } else {
                        &mut rsdp
                    };
                    let (off, size) = (le32(e, 116) as usize, e[120] as usize);
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&blob[off..off + size]);
                    let patched = u64::from_le_bytes(v) + base;
                    blob[off..off + size].copy_from_slice(&patched.to_le_bytes()[..size]);
                }
                3 => {
                    let blob = if which(4) == 0 {
                        &mut tables
                    } else {
                        &mut rsdp
                    };
                    let (off, start, len) = (
                        le32(e, 60) as usize,
                        le32(e, 64) as usize,
                        le32(e, 68) as usize,
                    );
                    let sum = blob[start..start + len]
                        .iter()
                        .fold(0u8, |a, &b| a.wrapping_add(b));
                    blob[off] = blob[off].wrapping_sub(sum);
                }
                _ => {}
            }
        }
        (tables, rsdp)
    }

    #[test]
    fn executing_the_script_links_and_checksums() {
        let (_, rsdp) = execute(&loader(), 0x7ff_0000, 0xf_0000);
        assert_eq!(le32(&rsdp, 16), 0x7ff_0010);
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            0x7ff_0010
        );
        let sum = |r: &[u8]| r.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp[..36]), 0);
    }

    #[test]
    fn rejects_bad_pointers_and_checksums() {
        let mut l = loader();
        for size in [0, 3, 16] {
            assert!(l
                .add_pointer(AcpiBlob::Rsdp, 0, size, AcpiBlob::Tables)
                .is_err());
        }
        // Runs past the end of the blob, including near u32::MAX.
        assert!(l
            .add_pointer(AcpiBlob::Rsdp, 32, 8, AcpiBlob::Tables)
            .is_err());
        assert!(l
            .add_pointer(AcpiBlob::Rsdp, u32::MAX, 8, AcpiBlob::Tables)
            .is_err());
        // The value is not an offset inside the target.
        l.blob_mut(AcpiBlob::Tables)[0] = 0x40;
        let err = l
            .add_pointer(AcpiBlob::Tables, 0, 1, AcpiBlob::Tables)
            .unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        for (offset, start, length) in [
            (8, 0, 0),
            (8, 0, 37),
            (20, 0, 20),
            (0, 1, 10),
            (0, u32::MAX, 2),
        ] {
            assert!(l
                .add_checksum(AcpiBlob::Rsdp, offset, start, length)
                .is_err());
        }
        assert_eq!(l.script().len(), 6 * LOADER_ENTRY_LEN, "nothing was added");
        assert!(AcpiLoader::new(vec![], vec![1]).is_err());
        assert!(AcpiLoader::new(vec![1], vec![]).is_err());
    }

    #[test]
    fn added_as_three_files() {
        let l = loader();
        let mut fw = FwCfg::new(TestMemory::new(0x100));
        fw.add_acpi(&l).unwrap();
        let key = fw.file_key(FILE_TABLE_LOADER).unwrap();
        assert_eq!(read_item(&mut fw, key, 6 * LOADER_ENTRY_LEN), l.script());
        assert_eq!(
            fw.item(fw.file_key(FILE_ACPI_RSDP).unwrap()).unwrap(),
            l.rsdp()
        );
        assert_eq!(
            fw.item(fw.file_key(FILE_ACPI_TABLES).unwrap()).unwrap(),
            l.tables()
        );
        assert!(matches!(
            fw.add_acpi(&l),
            Err(FwCfgError::DuplicateFile { .. })
        ));
    }
}
