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

/// Firmware (`--firmware`) is mapped read-only so that it ends here, at 4 GiB, where the reset vector is.
pub const FIRMWARE_END: u64 = 1 << 32;
/// Largest firmware image accepted (a 16 MiB flash, enough for OVMF).
pub const FIRMWARE_MAX_SIZE: u64 = 16 << 20;
/// The last `BIOS_ALIAS_SIZE` bytes of the firmware are also copied below 1 MiB, ending here: the legacy option-ROM
/// and BIOS area, where real-mode firmware runs and keeps its data. It is RAM from the start, as if the chipset had
/// already shadowed the BIOS (there are no PAM registers): a 256 KiB SeaBIOS finds all of its code there, which on a
/// PC it would copy down itself after unlocking the shadow RAM.
pub const BIOS_ALIAS_END: u64 = 0x10_0000;
/// Size of the legacy BIOS area copy (`0xc0000..0x100000`).
pub const BIOS_ALIAS_SIZE: u64 = 256 << 10;
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

// --- PCI segment 0 ---

/// PCI 32-bit MMIO window for BARs, at the bottom of the 32-bit MMIO hole.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the PCI 32-bit MMIO window (512 MiB, up to the ECAM area).
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM, "MMCONFIG") of segment 0.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
/// Size of the ECAM area: 1 MiB per bus for buses 0-255.
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
/// PCI configuration mechanism #1: address register; the data register is at `+ 4`.
pub const PCI_IO_CONFIG_PORT: u16 = 0xcf8;
// The 32-bit window and the ECAM area tile the bottom of the 32-bit MMIO hole, below the IOAPIC,
// so 32-bit ACPI descriptors can describe them.
const _: () = assert!(PCI_MMIO32_START >= MEM_32BIT_GAP_START);
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_MMCONFIG_START);
const _: () = assert!(PCI_MMCONFIG_START + PCI_MMCONFIG_SIZE <= IOAPIC_START);

/// Size of the PCI 64-bit MMIO window (64 GiB).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// The 64-bit MMIO window starts on a 1 GiB boundary.
const PCI_MMIO64_ALIGN: u64 = 1 << 30;

/// The PCI 64-bit MMIO window for a guest with `ram_size` bytes of RAM, as `(start, size)`.
///
/// It starts at the first 1 GiB boundary at or above both 4 GiB and the end of guest RAM (RAM
/// above 3 GiB is relocated above 4 GiB, as in `arch_memory_regions`) and is
/// [`PCI_MMIO64_SIZE`] long. For absurd RAM sizes the start saturates at the last 1 GiB
/// boundary of the address space; the caller checks that the window fits.
pub fn pci_mmio64_window(ram_size: u64) -> (u64, u64) {
    let above_gap = ram_size.saturating_sub(MEM_32BIT_GAP_START);
    let ram_end = RAM_64BIT_START.saturating_add(above_gap);
    let start = ram_end
        .div_ceil(PCI_MMIO64_ALIGN)
        .checked_mul(PCI_MMIO64_ALIGN)
        .unwrap_or(ram_end & !(PCI_MMIO64_ALIGN - 1));
    (start, PCI_MMIO64_SIZE)
}

/// First GSI (IOAPIC pin) of the PCI INTx interrupts.
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of GSIs the PCI INTx interrupts are spread over (IOAPIC pins 16-23).
pub const PCI_INTX_GSIS: u32 = 8;
/// Highest PCI device (slot) number on bus 0.
pub const PCI_MAX_SLOT: u8 = 31;

/// The GSI (IOAPIC pin) that INTx `pin` of the device in `slot` on bus 0 raises, as the DSDT's
/// `_PRT` describes it: `(slot + pin) % 8 + 16`. The interrupt is level triggered and active
/// low, as PCI INTx lines are.
///
/// `pin` counts from 0 for INTA# to 3 for INTD# (the `_PRT` numbering; the configuration space
/// Interrupt Pin register holds `pin + 1`). Slot 0, the host bridge, has no interrupt, so it and
/// anything out of range give `None`.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> Option<u32> {
    if slot == 0 || slot > PCI_MAX_SLOT || pin > 3 {
        return None;
    }
    Some((u32::from(slot) + u32::from(pin)) % PCI_INTX_GSIS + PCI_INTX_GSI_BASE)
}

// --- ACPI hotplug and power-button register blocks (MMIO, little-endian) ---

/// Generic Event Device: the pending-event register the DSDT's `GED0._EVT` reads.
pub const GED_START: u64 = 0xfe00_0000;
/// Size of the GED register block.
pub const GED_SIZE: u64 = 0x10;
/// IOAPIC pin of the GED interrupt (edge triggered, active high).
pub const GED_IRQ: u32 = 5;
/// CPU hotplug controller: CPU select and status registers.
pub const CPU_HOTPLUG_START: u64 = 0xfe00_1000;
/// Size of the CPU hotplug controller block.
pub const CPU_HOTPLUG_SIZE: u64 = 0x10;
/// PCI hotplug controller for bus 0: slots up, slots down, eject, present.
pub const PCI_HOTPLUG_START: u64 = 0xfe00_2000;
/// Size of the PCI hotplug controller block.
pub const PCI_HOTPLUG_SIZE: u64 = 0x10;
/// Memory hotplug controller: slot select, base, length and status registers.
pub const MEMORY_HOTPLUG_START: u64 = 0xfe00_3000;
/// Size of the memory hotplug controller block.
pub const MEMORY_HOTPLUG_SIZE: u64 = 0x20;
// The blocks sit in the 32-bit MMIO hole between the ECAM area and the IOAPIC, in address order
// without overlapping, so 32-bit ACPI descriptors can describe them.
const _: () = assert!(PCI_MMCONFIG_START + PCI_MMCONFIG_SIZE <= GED_START);
const _: () = assert!(GED_START + GED_SIZE <= CPU_HOTPLUG_START);
const _: () = assert!(CPU_HOTPLUG_START + CPU_HOTPLUG_SIZE <= PCI_HOTPLUG_START);
const _: () = assert!(PCI_HOTPLUG_START + PCI_HOTPLUG_SIZE <= MEMORY_HOTPLUG_START);
const _: () = assert!(MEMORY_HOTPLUG_START + MEMORY_HOTPLUG_SIZE <= IOAPIC_START);
// The GED interrupt is an IOAPIC pin of its own: not COM1's, not a PCI INTx pin.
const _: () = assert!(GED_IRQ < IOAPIC_PINS && GED_IRQ != COM1_IRQ && GED_IRQ < PCI_INTX_GSI_BASE);

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

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn mmio64_window_follows_ram() {
        // (RAM size, expected start): at least 4 GiB, RAM above 3 GiB moves above 4 GiB.
        for (ram, start) in [
            (0, 4 * GIB),
            (512 << 20, 4 * GIB),
            (3 * GIB, 4 * GIB),
            (3 * GIB + 1, 5 * GIB),
            (4 * GIB, 5 * GIB),
            (4 * GIB + 4096, 6 * GIB),
            (5 * GIB, 6 * GIB),
            (64 * GIB + (1 << 20), 66 * GIB),
        ] {
            assert_eq!(
                pci_mmio64_window(ram),
                (start, 64 * GIB),
                "{ram:#x} bytes of RAM"
            );
        }
    }

    #[test]
    fn mmio64_window_never_overlaps_ram() {
        for ram in [1, GIB, 3 * GIB - 1, 7 * GIB + 12345, 1 << 40] {
            let (start, size) = pci_mmio64_window(ram);
            let ram_end = if ram <= 3 * GIB { ram } else { ram + GIB };
            assert!(start >= ram_end && start >= 4 * GIB, "{ram:#x}");
            assert_eq!(start % GIB, 0);
            assert_eq!(size, 64 * GIB);
        }
    }

    #[test]
    fn mmio64_window_for_absurd_ram_sizes() {
        let (start, size) = pci_mmio64_window(u64::MAX);
        assert_eq!(start % GIB, 0);
        assert!(
            start.checked_add(size).is_none(),
            "the caller must reject it"
        );
    }

    #[test]
    fn pci_windows_tile_the_32bit_hole() {
        assert_eq!(PCI_MMIO32_START, MEM_32BIT_GAP_START);
        assert_eq!(PCI_MMIO32_START + PCI_MMIO32_SIZE, PCI_MMCONFIG_START);
        assert_eq!(PCI_MMCONFIG_SIZE, 256 << 20, "1 MiB for each of 256 buses");
    }

    #[test]
    fn hotplug_blocks_as_in_the_design_notes() {
        assert_eq!((GED_START, GED_SIZE, GED_IRQ), (0xfe00_0000, 0x10, 5));
        assert_eq!((CPU_HOTPLUG_START, CPU_HOTPLUG_SIZE), (0xfe00_1000, 0x10));
        assert_eq!((PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE), (0xfe00_2000, 0x10));
        assert_eq!(
            (MEMORY_HOTPLUG_START, MEMORY_HOTPLUG_SIZE),
            (0xfe00_3000, 0x20)
        );
    }

    #[test]
    fn intx_gsis() {
        assert_eq!(pci_intx_gsi(1, 0), Some(17));
        assert_eq!(pci_intx_gsi(1, 3), Some(20));
        assert_eq!(pci_intx_gsi(7, 0), Some(23));
        assert_eq!(pci_intx_gsi(7, 1), Some(16));
        assert_eq!(pci_intx_gsi(31, 3), Some(18));
        for slot in 1..=31 {
            for pin in 0..4 {
                let gsi = pci_intx_gsi(slot, pin).unwrap();
                assert!((16..24).contains(&gsi) && gsi < IOAPIC_PINS);
            }
        }
        assert_eq!(pci_intx_gsi(0, 0), None, "the host bridge");
        assert_eq!(pci_intx_gsi(32, 0), None);
        assert_eq!(pci_intx_gsi(1, 4), None);
    }
}
