//! Initial vCPU state: general registers, segments and control registers, the boot GDT/IDT and
//! page tables they point at, FPU, MSRs and the local APIC's LINT pins.

use hypervisor::x86_64::{
    FpuState, LapicState, MsrEntry, SegmentRegister, SpecialRegisters, StandardRegisters,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::boot::BootProtocol;
use super::layout::{
    BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors from writing the boot GDT, IDT or page tables.
#[derive(Debug, Error)]
pub enum Error {
    /// A boot structure could not be written to guest memory.
    #[error("cannot write the boot {what} at {addr:#x} into guest memory; give the guest at least 1 MiB of RAM")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
}

// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const LARGE_PAGE_SIZE: u64 = 2 << 20;
const ENTRIES_PER_TABLE: u64 = 512;

// GDT selectors (index * 8).
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

// Descriptor access/flags words: the access byte in bits 0..8, the G/DB/L/AVL nibble in bits
// 12..16 (the limit's high nibble sits between them in the descriptor).
/// Present, DPL 0, code execute/read accessed, 4 KiB granular, long mode (L).
const CODE64_FLAGS: u16 = 0xa09b;
/// Present, DPL 0, code execute/read accessed, 4 KiB granular, 32-bit default size (D).
const CODE32_FLAGS: u16 = 0xc09b;
/// Present, DPL 0, data read/write accessed, 4 KiB granular, 32-bit (B).
const DATA_FLAGS: u16 = 0xc093;
/// Present, DPL 0, busy 32/64-bit TSS, byte granular.
const TSS_FLAGS: u16 = 0x008b;
const FLAT_LIMIT: u32 = 0xfffff;
const TSS_LIMIT: u32 = 0x67;

/// General registers for the boot vCPU entering at `entry`.
///
/// Linux boot: `rsi` points at the zero page and `rsp`/`rbp` at the boot stack. PVH: `rbx`
/// points at `hvm_start_info`.
pub fn setup_regs(entry: GuestAddress, protocol: BootProtocol) -> StandardRegisters {
    let mut regs = StandardRegisters {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        ..Default::default()
    };
    match protocol {
        BootProtocol::LinuxBoot => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::PvhBoot => {
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// Writes the boot GDT and IDT (and for Linux boot the identity page tables) and sets `sregs`
/// to match: 64-bit long mode with paging for Linux boot, flat 32-bit protected mode without
/// paging for PVH. Fields not named here (APIC base, interrupt bitmap) are left as they were.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut SpecialRegisters,
    protocol: BootProtocol,
) -> Result<(), Error> {
    let gdt = boot_gdt(protocol);
    write_gdt(mem, &gdt)?;
    write_idt(mem)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = segment(gdt[1], CODE_SELECTOR);
    let data = segment(gdt[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], TSS_SELECTOR);

    match protocol {
        BootProtocol::LinuxBoot => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        }
        BootProtocol::PvhBoot => {
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.cr0 = CR0_PE | CR0_ET;
        }
    }
    Ok(())
}

/// Encodes a segment descriptor from its access/flags word, base and 20-bit limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Decodes a descriptor into the register form KVM takes (byte-granular limit).
fn segment(entry: u64, selector: u16) -> SegmentRegister {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let granular = bit(55) == 1;
    let present = bit(47);
    SegmentRegister {
        base,
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_ENTRIES] {
    let code = match protocol {
        BootProtocol::LinuxBoot => CODE64_FLAGS,
        BootProtocol::PvhBoot => CODE32_FLAGS,
    };
    [
        0,
        gdt_entry(code, 0, FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
        gdt_entry(TSS_FLAGS, 0, TSS_LIMIT),
    ]
}

fn write_u64<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    value: u64,
    what: &'static str,
) -> Result<(), Error> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<(), Error> {
    for (i, entry) in gdt.iter().enumerate() {
        write_u64(mem, BOOT_GDT_START + 8 * i as u64, *entry, "GDT")?;
    }
    Ok(())
}

fn write_idt<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    write_u64(mem, BOOT_IDT_START, 0, "IDT")
}

/// Identity-maps the first 1 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> i * 2 MiB.
fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let table = PTE_PRESENT | PTE_WRITABLE;
    write_u64(mem, PML4_START, PDPTE_START | table, "PML4")?;
    write_u64(mem, PDPTE_START, PDE_START | table, "PDPT")?;
    for i in 0..ENTRIES_PER_TABLE {
        let entry = (i * LARGE_PAGE_SIZE) | table | PTE_PAGE_SIZE;
        write_u64(mem, PDE_START + 8 * i, entry, "page directory")?;
    }
    Ok(())
}

/// FPU state at reset: x87 control word 0x37f (all exceptions masked, extended precision) and
/// MXCSR 0x1f80 (all SSE exceptions masked).
pub fn setup_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// MSR values for a vCPU at boot: system-call MSRs and the TSC cleared, fast strings enabled,
/// MTRRs enabled with write-back as the default memory type.
pub fn boot_msrs() -> Vec<MsrEntry> {
    let msr = |index: u32, data: u64| MsrEntry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

/// Offsets of the LVT LINT0/LINT1 registers in the xAPIC register page.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery-mode field (bits 8..11) and the two modes used.
const APIC_DELIVERY_MODE_MASK: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires the local APIC's LINT0 to ExtINT (the legacy PIC path) and LINT1 to NMI, keeping the
/// other LVT bits.
pub fn set_lint(lapic: &mut LapicState) {
    set_delivery_mode(lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
}

fn read_apic_reg(lapic: &LapicState, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    u32::from_le_bytes(bytes)
}

fn write_apic_reg(lapic: &mut LapicState, offset: usize, value: u32) {
    for (r, b) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *r = b as std::os::raw::c_char;
    }
}

fn set_delivery_mode(lapic: &mut LapicState, offset: usize, mode: u32) {
    let reg = read_apic_reg(lapic, offset);
    let reg = (reg & !APIC_DELIVERY_MODE_MASK) | (mode << 8);
    write_apic_reg(lapic, offset, reg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the boot page tables like the MMU does for a 2 MiB page.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let addr_mask = 0x000f_ffff_ffff_f000;
        let pml4e = read_u64(mem, (cr3 & addr_mask) + ((va >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read_u64(mem, (pml4e & addr_mask) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & addr_mask) + ((va >> 21) & 0x1ff) * 8);
        if pde & PTE_PRESENT == 0 || pde & PTE_PAGE_SIZE == 0 {
            return None;
        }
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
    }

    #[test]
    fn linux_boot_regs() {
        let regs = setup_regs(GuestAddress(0x100_0000), BootProtocol::LinuxBoot);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rsp, 0x8ff0);
        assert_eq!(regs.rbp, 0x8ff0);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rbx, 0);
    }

    #[test]
    fn pvh_regs() {
        let regs = setup_regs(GuestAddress(0x100_1000), BootProtocol::PvhBoot);
        assert_eq!(regs.rip, 0x100_1000);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(regs.rsi, 0);
    }

    #[test]
    fn gdt_entry_round_trips() {
        let e = gdt_entry(CODE64_FLAGS, 0, FLAT_LIMIT);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let e = gdt_entry(DATA_FLAGS, 0x1234_5678, 0xabcde);
        let s = segment(e, 0x10);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
        assert_eq!(
            (s.type_, s.s, s.present, s.db, s.l, s.g),
            (3, 1, 1, 1, 0, 1)
        );
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn linux_boot_sregs() {
        let mem = memory();
        let mut sregs = SpecialRegisters {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        setup_sregs(&mem, &mut sregs, BootProtocol::LinuxBoot).unwrap();

        assert_eq!(read_u64(&mem, 0x500), 0);
        assert_eq!(read_u64(&mem, 0x508), 0x00af_9b00_0000_ffff);
        assert_eq!(read_u64(&mem, 0x510), 0x00cf_9300_0000_ffff);
        assert_eq!(read_u64(&mem, 0x518), 0x0000_8b00_0000_0067);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));

        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.type_), (1, 0, 0xb));
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xffff_ffff));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!((seg.type_, seg.present, seg.s, seg.db), (3, 1, 1, 1));
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!((sregs.tr.type_, sregs.tr.s, sregs.tr.limit), (0xb, 0, 0x67));

        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "untouched");
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = memory();
        let mut sregs = SpecialRegisters::default();
        setup_sregs(&mem, &mut sregs, BootProtocol::LinuxBoot).unwrap();
        for va in [0, 0x7000, 0x10_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&mem, sregs.cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, sregs.cr3, 1 << 30), None);
        assert_eq!(translate(&mem, sregs.cr3, 1 << 39), None);
        // Every PD entry is a present, writable 2 MiB page.
        for i in 0..512u64 {
            assert_eq!(read_u64(&mem, 0xb000 + i * 8), (i << 21) | 0x83);
        }
    }

    #[test]
    fn pvh_sregs() {
        let mem = memory();
        let mut sregs = SpecialRegisters {
            cr3: 0x1234_5000,
            efer: 0x500,
            cr4: 0x20,
            ..Default::default()
        };
        setup_sregs(&mem, &mut sregs, BootProtocol::PvhBoot).unwrap();
        assert_eq!(sregs.cr0, 0x11);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.g), (0, 1, 1));
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xffff_ffff));
        assert_eq!(
            (sregs.ds.base, sregs.ds.limit, sregs.ds.db),
            (0, 0xffff_ffff, 1)
        );
        assert_eq!(sregs.tr.type_, 0xb);
        assert_eq!(read_u64(&mem, 0x508), 0x00cf_9b00_0000_ffff);
        // No page tables are written for PVH.
        assert_eq!(read_u64(&mem, 0x9000), 0);
    }

    #[test]
    fn sregs_without_low_memory_fail() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let mut sregs = SpecialRegisters::default();
        let err = setup_sregs(&mem, &mut sregs, BootProtocol::LinuxBoot).unwrap_err();
        assert!(matches!(err, Error::GuestWrite { addr: 0x500, .. }));
    }

    #[test]
    fn fpu_defaults() {
        let fpu = setup_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }

    #[test]
    fn msrs() {
        let msrs = boot_msrs();
        let get = |index: u32| msrs.iter().find(|m| m.index == index).map(|m| m.data);
        for index in [
            0x174,
            0x175,
            0x176,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083,
            0xc000_0084,
            0xc000_0102,
            0x10,
        ] {
            assert_eq!(get(index), Some(0), "msr {index:#x}");
        }
        assert_eq!(get(0x1a0), Some(1));
        assert_eq!(get(0x2ff), Some(0x806));
    }

    #[test]
    fn lint_pins() {
        let mut lapic = LapicState::default();
        // Masked, with a stale fixed-mode vector, as after reset.
        write_apic_reg(&mut lapic, 0x350, 0x0001_0020);
        write_apic_reg(&mut lapic, 0x360, 0x0001_0000);
        write_apic_reg(&mut lapic, 0x370, 0xdead_beef);
        set_lint(&mut lapic);
        assert_eq!(read_apic_reg(&lapic, 0x350), 0x0001_0720);
        assert_eq!(read_apic_reg(&lapic, 0x360), 0x0001_0400);
        assert_eq!(read_apic_reg(&lapic, 0x370), 0xdead_beef);
    }
}
