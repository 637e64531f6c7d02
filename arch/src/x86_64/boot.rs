//! Boot parameters handed to the guest kernel: the Linux zero page or the PVH start info, and
//! where the initramfs goes.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::e820::{e820_table, E820Entry};
use super::layout::{
    CMDLINE_MAX_SIZE, HIGH_RAM_START, MEM_32BIT_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};

/// `boot_flag` of a valid setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` of a valid setup header: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment advertised in the default header (16 MiB, what x86_64 kernels use).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// The initramfs starts on a page boundary.
const PAGE_SIZE: u64 = 0x1000;
/// `hvm_start_info` version that carries the memory map.
const PVH_START_INFO_VERSION: u32 = 1;

/// Errors from writing boot parameters or placing the initramfs.
#[derive(Debug, Error)]
pub enum Error {
    /// The command line is not where guest RAM is, or is empty or too long.
    #[error("the kernel command line ({size} bytes at {addr:#x}) must be 1..={max} bytes inside guest RAM; shorten it or give the guest more memory")]
    Cmdline {
        /// Where the command line was said to be.
        addr: u64,
        /// Its size including the NUL.
        size: usize,
        /// The largest size allowed.
        max: usize,
    },
    /// The initramfs range given to `configure_system` is not inside guest RAM.
    #[error("the initramfs ({size} bytes at {addr:#x}) is not inside guest RAM; load it with initramfs_load_addr")]
    InitramfsOutOfRange {
        /// Its guest address.
        addr: u64,
        /// Its size in bytes.
        size: usize,
    },
    /// An empty initramfs cannot be placed.
    #[error("the initramfs is empty; pass a non-empty initramfs or none")]
    EmptyInitramfs,
    /// The initramfs does not fit between the kernel and the highest address allowed.
    #[error("an initramfs of {size} bytes does not fit in low RAM between {floor:#x} and {top:#x}; give the guest more memory or use a smaller initramfs")]
    InitramfsTooLarge {
        /// Its size in bytes.
        size: usize,
        /// The lowest address it may use (end of the kernel).
        floor: u64,
        /// The end (exclusive) of the space it may use.
        top: u64,
    },
    /// Guest memory has no RAM at the kernel load address.
    #[error("guest memory has no RAM at {0:#x}; give the guest more than 1 MiB of memory")]
    NoLowRam(u64),
    /// The RSDP address is not inside guest RAM.
    #[error("the ACPI RSDP address {0:#x} is outside guest RAM; build the ACPI tables in guest memory first")]
    RsdpOutOfRange(u64),
    /// The memory map has more entries than the boot structure can hold.
    #[error("the memory map has {count} entries but the boot structure holds at most {max}; use a simpler memory layout")]
    TooManyE820Entries {
        /// Entries in the map.
        count: usize,
        /// Entries the structure holds.
        max: usize,
    },
    /// Writing the zero page failed.
    #[error("cannot write the zero page at {ZERO_PAGE_START:#x} into guest memory ({0}); give the guest at least 1 MiB of RAM")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Writing the PVH start info, memory map or module list failed.
    #[error("cannot write the PVH start info at {PVH_INFO_START:#x} into guest memory ({0}); give the guest at least 1 MiB of RAM")]
    PvhStartInfo(#[source] linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, `rsi` points at the zero page.
    LinuxBoot,
    /// PVH: 32-bit protected mode without paging, `rbx` points at `hvm_start_info`.
    PvhBoot,
}

/// What the boot parameters describe.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup {
    /// Entry convention, which decides between zero page and PVH start info.
    pub protocol: BootProtocol,
    /// Where the NUL-terminated command line is.
    pub cmdline_addr: GuestAddress,
    /// Size of the command line including its NUL.
    pub cmdline_size: usize,
    /// Guest address and size of the initramfs, if any.
    pub initramfs: Option<(GuestAddress, usize)>,
    /// The setup header of a bzImage, copied into the zero page; `None` for other kernels.
    pub setup_header: Option<setup_header>,
    /// Where the ACPI RSDP is, if the guest has ACPI tables.
    pub rsdp_addr: Option<GuestAddress>,
    /// Guest RAM size in bytes, laid out by `arch_memory_regions`.
    pub ram_size: u64,
}

/// Writes the boot parameters for `setup.protocol` into guest memory.
///
/// Linux boot: the zero page at `ZERO_PAGE_START` with the e820 map, command line pointer,
/// initramfs, RSDP address and loader type, on top of the bzImage's setup header if given or a
/// minimal valid header otherwise. PVH: `hvm_start_info` at `PVH_INFO_START`, its memory map at
/// `PVH_MEMMAP_START` and, with an initramfs, one module at `PVH_MODLIST_START`.
pub fn configure_system<M: GuestMemoryBackend>(mem: &M, setup: &BootSetup) -> Result<(), Error> {
    check_cmdline(mem, setup)?;
    if let Some((addr, size)) = setup.initramfs {
        if size == 0 || !mem.check_range(addr, size) {
            return Err(Error::InitramfsOutOfRange { addr: addr.0, size });
        }
    }
    if let Some(rsdp) = setup.rsdp_addr {
        if !mem.address_in_range(rsdp) {
            return Err(Error::RsdpOutOfRange(rsdp.0));
        }
    }
    let e820 = e820_table(setup.ram_size);
    match setup.protocol {
        BootProtocol::LinuxBoot => write_zero_page(mem, setup, &e820),
        BootProtocol::PvhBoot => write_pvh_start_info(mem, setup, &e820),
    }
}

fn check_cmdline<M: GuestMemoryBackend>(mem: &M, setup: &BootSetup) -> Result<(), Error> {
    let size = setup.cmdline_size;
    if size == 0 || size > CMDLINE_MAX_SIZE || !mem.check_range(setup.cmdline_addr, size) {
        return Err(Error::Cmdline {
            addr: setup.cmdline_addr.0,
            size,
            max: CMDLINE_MAX_SIZE,
        });
    }
    Ok(())
}

fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDR_MAGIC,
        kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
        ..Default::default()
    }
}

fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn high32(v: u64) -> u32 {
    (v >> 32) as u32
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    e820: &[E820Entry],
) -> Result<(), Error> {
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyE820Entries {
            count: e820.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        });
    }
    let mut params = boot_params {
        hdr: setup.setup_header.unwrap_or_else(default_setup_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = low32(setup.cmdline_addr.0);
    params.ext_cmd_line_ptr = high32(setup.cmdline_addr.0);
    if let Some((addr, size)) = setup.initramfs {
        let size = size as u64;
        params.hdr.ramdisk_image = low32(addr.0);
        params.ext_ramdisk_image = high32(addr.0);
        params.hdr.ramdisk_size = low32(size);
        params.ext_ramdisk_size = high32(size);
    }
    if let Some(rsdp) = setup.rsdp_addr {
        params.acpi_rsdp_addr = rsdp.0;
    }
    // Bounded by E820_MAX_ENTRIES_ZEROPAGE (128) above.
    params.e820_entries = e820.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    let params = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(Error::ZeroPage)
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    e820: &[E820Entry],
) -> Result<(), Error> {
    let max_entries = ((PVH_MODLIST_START - PVH_MEMMAP_START) as usize)
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if e820.len() > max_entries {
        return Err(Error::TooManyE820Entries {
            count: e820.len(),
            max: max_entries,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // The PVH memory map types are the e820 types.
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: setup.cmdline_addr.0,
        rsdp_paddr: setup.rsdp_addr.map_or(0, |a| a.0),
        memmap_paddr: PVH_MEMMAP_START,
        // Bounded by max_entries above.
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = setup.initramfs.map(|(addr, size)| hvm_modlist_entry {
        paddr: addr.0,
        size: size as u64,
        ..Default::default()
    });
    if module.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::PvhStartInfo)
}

/// Highest page-aligned address where an initramfs of `size` bytes fits in low RAM.
///
/// The initramfs ends at or below `addr_max` (the kernel's `initrd_addr_max`, the highest byte it
/// may occupy; callers pass 0x37ffffff when the kernel does not say), below the 32-bit MMIO gap
/// and inside the RAM region that holds the kernel, and starts at or above `kernel_end`.
pub fn initramfs_load_addr<M: GuestMemoryBackend>(
    mem: &M,
    size: usize,
    addr_max: u64,
    kernel_end: u64,
) -> Result<GuestAddress, Error> {
    if size == 0 {
        return Err(Error::EmptyInitramfs);
    }
    let region = mem
        .find_region(GuestAddress(HIGH_RAM_START))
        .ok_or(Error::NoLowRam(HIGH_RAM_START))?;
    let ram_end = region.start_addr().0.saturating_add(region.len());
    let top = ram_end
        .min(MEM_32BIT_GAP_START)
        .min(addr_max.saturating_add(1));
    let floor = kernel_end.max(HIGH_RAM_START);
    let too_large = Error::InitramfsTooLarge { size, floor, top };
    let start = top
        .checked_sub(size as u64)
        .map(|s| s & !(PAGE_SIZE - 1))
        .ok_or(too_large)?;
    if start < floor {
        return Err(Error::InitramfsTooLarge { size, floor, top });
    }
    Ok(GuestAddress(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::e820::{arch_memory_regions, E820_RAM, E820_RESERVED};
    use linux_loader::loader::elf::start_info::XEN_HVM_MEMMAP_TYPE_RAM;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    fn setup(protocol: BootProtocol, ram_size: u64) -> BootSetup {
        BootSetup {
            protocol,
            cmdline_addr: GuestAddress(0x20000),
            cmdline_size: 13,
            initramfs: None,
            setup_header: None,
            rsdp_addr: None,
            ram_size,
        }
    }

    fn zp<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, offset: u64) -> T {
        mem.read_obj(GuestAddress(0x7000 + offset)).unwrap()
    }

    #[test]
    fn zero_page_fields_at_their_offsets() {
        let mem = memory(128 * MIB);
        let mut s = setup(BootProtocol::LinuxBoot, 128 * MIB);
        s.initramfs = Some((GuestAddress(0x700_0000), 0x12345));
        s.rsdp_addr = Some(GuestAddress(0xe0000));
        configure_system(&mem, &s).unwrap();

        assert_eq!(zp::<u64>(&mem, 0x070), 0xe0000, "acpi_rsdp_addr");
        assert_eq!(zp::<u16>(&mem, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(zp::<u32>(&mem, 0x202), 0x5372_6448, "HdrS");
        assert_eq!(zp::<u8>(&mem, 0x210), 0xff, "type_of_loader");
        assert_eq!(zp::<u32>(&mem, 0x218), 0x700_0000, "ramdisk_image");
        assert_eq!(zp::<u32>(&mem, 0x21c), 0x12345, "ramdisk_size");
        assert_eq!(zp::<u32>(&mem, 0x228), 0x20000, "cmd_line_ptr");
        assert_eq!(zp::<u32>(&mem, 0x0c0), 0, "ext_ramdisk_image");
        assert_eq!(zp::<u32>(&mem, 0x0c8), 0, "ext_cmd_line_ptr");

        assert_eq!(zp::<u8>(&mem, 0x1e8), 3, "e820_entries");
        let entry = |i: u64| -> (u64, u64, u32) {
            let base = 0x2d0 + i * 20;
            (zp(&mem, base), zp(&mem, base + 8), zp(&mem, base + 16))
        };
        assert_eq!(entry(0), (0, 0x9fc00, E820_RAM));
        assert_eq!(entry(1), (0x9fc00, 0x10_0000 - 0x9fc00, E820_RESERVED));
        assert_eq!(entry(2), (MIB, 127 * MIB, E820_RAM));
        assert_eq!(entry(3), (0, 0, 0));
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let mem = memory(16 * MIB);
        let mut s = setup(BootProtocol::LinuxBoot, 16 * MIB);
        s.setup_header = Some(setup_header {
            setup_sects: 27,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            type_of_loader: 0,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        });
        configure_system(&mem, &s).unwrap();
        assert_eq!(zp::<u8>(&mem, 0x1f1), 27, "setup_sects");
        assert_eq!(zp::<u16>(&mem, 0x206), 0x020f, "version");
        assert_eq!(zp::<u32>(&mem, 0x22c), 0x7fff_ffff, "initrd_addr_max");
        assert_eq!(zp::<u8>(&mem, 0x210), 0xff, "type_of_loader overridden");
        assert_eq!(zp::<u32>(&mem, 0x218), 0, "no ramdisk");
        assert_eq!(zp::<u64>(&mem, 0x070), 0, "no rsdp");
    }

    #[test]
    fn zero_page_e820_above_4g() {
        let size = 3 * GIB + 512 * MIB;
        // Only the low region is touched; the e820 map is derived from ram_size.
        let mem = memory(16 * MIB);
        configure_system(&mem, &setup(BootProtocol::LinuxBoot, size)).unwrap();
        assert_eq!(zp::<u8>(&mem, 0x1e8), 4);
        let base = 0x2d0 + 3 * 20;
        assert_eq!(zp::<u64>(&mem, base), 4 * GIB);
        assert_eq!(zp::<u64>(&mem, base + 8), 512 * MIB);
    }

    #[test]
    fn pvh_start_info_and_memmap() {
        let mem = memory(128 * MIB);
        let mut s = setup(BootProtocol::PvhBoot, 128 * MIB);
        s.initramfs = Some((GuestAddress(0x700_0000), 0x4000));
        s.rsdp_addr = Some(GuestAddress(0xe0000));
        configure_system(&mem, &s).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_paddr, 0x6040);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);

        let entries: Vec<hvm_memmap_table_entry> = (0..3)
            .map(|i| mem.read_obj(GuestAddress(0x6040 + i * 24)).unwrap())
            .collect();
        assert_eq!((entries[0].addr, entries[0].size), (0, 0x9fc00));
        assert_eq!(entries[0].type_, XEN_HVM_MEMMAP_TYPE_RAM);
        assert_eq!(entries[1].type_, E820_RESERVED);
        assert_eq!((entries[2].addr, entries[2].size), (MIB, 127 * MIB));

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x700_0000, 0x4000));
        assert_eq!(module.cmdline_paddr, 0);
    }

    #[test]
    fn pvh_without_initramfs_has_no_modules() {
        let mem = memory(16 * MIB);
        configure_system(&mem, &setup(BootProtocol::PvhBoot, 16 * MIB)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert_eq!(info.rsdp_paddr, 0);
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let mem = memory(16 * MIB);
        let mut s = setup(BootProtocol::LinuxBoot, 16 * MIB);
        s.cmdline_size = 0;
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::Cmdline { .. })
        ));
        s.cmdline_size = CMDLINE_MAX_SIZE + 1;
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::Cmdline { .. })
        ));
        s.cmdline_size = 10;
        s.cmdline_addr = GuestAddress(16 * MIB - 4);
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::Cmdline { .. })
        ));

        let mut s = setup(BootProtocol::PvhBoot, 16 * MIB);
        s.initramfs = Some((GuestAddress(15 * MIB), 2 * MIB as usize));
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::InitramfsOutOfRange { .. })
        ));
        s.initramfs = None;
        s.rsdp_addr = Some(GuestAddress(GIB));
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::RsdpOutOfRange(_))
        ));
    }

    #[test]
    fn zero_page_outside_memory_is_an_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x20000), 0x10000)]).unwrap();
        let s = setup(BootProtocol::LinuxBoot, 16 * MIB);
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::ZeroPage(_))
        ));
        let s = setup(BootProtocol::PvhBoot, 16 * MIB);
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::PvhStartInfo(_))
        ));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let mem = memory(128 * MIB);
        let addr = initramfs_load_addr(&mem, 0x10_0000, 0x37ff_ffff, 0x20_0000).unwrap();
        assert_eq!(addr, GuestAddress(127 * MIB));
        // Unaligned sizes round the start down to a page.
        let addr = initramfs_load_addr(&mem, 0x1234, 0x37ff_ffff, 0x20_0000).unwrap();
        assert_eq!(addr.0 % 0x1000, 0);
        assert_eq!(addr, GuestAddress(128 * MIB - 0x2000));
        assert!(addr.0 + 0x1234 <= 128 * MIB);
    }

    #[test]
    fn initramfs_respects_addr_max() {
        let mem = memory(GIB);
        let addr = initramfs_load_addr(&mem, 0x10_0000, 0x1fff_ffff, 0x20_0000).unwrap();
        assert_eq!(addr, GuestAddress(0x1ff0_0000));
        let addr = initramfs_load_addr(&mem, 0x10_0000, 0x37ff_ffff, 0x20_0000).unwrap();
        assert_eq!(addr, GuestAddress(0x3800_0000 - MIB));
    }

    #[test]
    fn initramfs_stays_below_the_gap() {
        let mem = memory(4 * GIB);
        let addr = initramfs_load_addr(&mem, 0x10_0000, u64::from(u32::MAX), 0x20_0000).unwrap();
        assert_eq!(addr, GuestAddress(MEM_32BIT_GAP_START - MIB));
    }

    #[test]
    fn initramfs_that_does_not_fit() {
        let mem = memory(16 * MIB);
        // Would overlap the kernel.
        assert!(matches!(
            initramfs_load_addr(&mem, 0x80_0000, 0x37ff_ffff, 0x90_0000),
            Err(Error::InitramfsTooLarge { .. })
        ));
        // Larger than all of RAM.
        assert!(matches!(
            initramfs_load_addr(&mem, 32 * MIB as usize, 0x37ff_ffff, 0x20_0000),
            Err(Error::InitramfsTooLarge { .. })
        ));
        // addr_max below the kernel end.
        assert!(matches!(
            initramfs_load_addr(&mem, 0x1000, 0x10_0000, 0x20_0000),
            Err(Error::InitramfsTooLarge { .. })
        ));
        assert!(matches!(
            initramfs_load_addr(&mem, 0, 0x37ff_ffff, 0x20_0000),
            Err(Error::EmptyInitramfs)
        ));
        let tiny: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        assert!(matches!(
            initramfs_load_addr(&tiny, 0x1000, 0x37ff_ffff, 0),
            Err(Error::NoLowRam(_))
        ));
    }

    #[test]
    fn initramfs_fits_exactly() {
        let mem = memory(16 * MIB);
        let addr = initramfs_load_addr(&mem, 8 * MIB as usize, 0x37ff_ffff, 8 * MIB).unwrap();
        assert_eq!(addr, GuestAddress(8 * MIB));
    }
}
