//! The fixed x86_64 guest-physical memory map and the port numbers the platform tables describe.
//!
//! These are the addresses recorded in the design notes; every crate that places something in
//! guest memory takes its address from here.

// --- Low memory: boot structures ---

/// Boot GDT: null, code (selector 0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of descriptors in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;
/// Boot IDT (a single empty descriptor).
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map (array of `hvm_memmap_table_entry`), right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (array of `hvm_modlist_entry`); the memory map may use the space before it.
pub const PVH_MODLIST_START: u64 = 0x6800;

/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the boot vCPU (Linux boot protocol).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Boot page tables: the PML4 ...
pub const PML4_START: u64 = 0x9000;
/// ... its single page-directory-pointer table ...
pub const PDPTE_START: u64 = 0xa000;
/// ... and the page directory mapping the first 1 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Extended BIOS data area: MP floating pointer and MP configuration table. Also the end of the
/// first RAM range in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the EBDA (start of the legacy VGA hole).
pub const EBDA_END: u64 = 0xa0000;

/// ACPI root system description pointer; the other ACPI tables follow it.
pub const RSDP_POINTER: u64 = 0xe0000;
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_TABLES_END: u64 = 0x10_0000;

/// Start of RAM above the legacy area; the kernel is loaded here.
pub const HIGH_RAM_START: u64 = 0x10_0000;

// --- The 32-bit MMIO hole and RAM above 4 GiB ---

/// Start of the 32-bit MMIO hole: low RAM ends here at the latest.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole (up to 4 GiB).
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
/// Start of the RAM that does not fit below the MMIO hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Number of IOAPIC input pins.
pub const IOAPIC_PINS: u32 = 24;
/// Local APIC register window (the same address for every vCPU).
pub const APIC_START: u64 = 0xfee0_0000;

// --- Ports ---

/// COM1 16550 UART base port (8 registers).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt: ISA IRQ and IOAPIC pin.
pub const COM1_IRQ: u32 = 4;
/// ACPI sleep control/status and reset register (hardware-reduced FADT).
pub const ACPI_PM_PORT: u16 = 0x600;
