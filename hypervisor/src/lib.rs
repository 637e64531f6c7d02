//! The hypervisor abstraction: a [`Hypervisor`] creates [`Vm`]s, a `Vm` owns memory slots and interrupt plumbing and
//! creates [`Vcpu`]s, and [`Vcpu::run`] reports why the guest stopped as a [`VmExit`].
//!
//! Nothing here knows about the VMM: port and MMIO accesses are resolved inside `run` through the [`ExitHandler`] the
//! caller passes, so no borrow of KVM's shared `kvm_run` page leaks out. KVM is the one backend today
//! ([`kvm::KvmHypervisor`]).

pub mod kvm;
pub mod x86_64;

use std::sync::Arc;

use x86_64::{CpuIdEntry, FpuState, LapicState, MsrEntry, SpecialRegisters, StandardRegisters};

pub use kvm::KvmHypervisor;

/// Errors from the hypervisor layer. Each names the operation that failed and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM; enable virtualization and load the kvm module (kvm_intel or kvm_amd)")]
    KvmMissing,
    /// /dev/kvm exists but this user may not open it.
    #[error("permission denied opening /dev/kvm: run as root or add this user to the group that owns /dev/kvm (usually 'kvm')")]
    KvmPermission,
    /// Any other failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] std::io::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (expected 12)")]
    KvmApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("this KVM lacks a required capability: {0}")]
    CapabilityMissing(&'static str),
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Convenience result type of this crate.
pub type Result<T> = std::result::Result<T, HypervisorError>;

impl HypervisorError {
    pub(crate) fn ioctl(op: &'static str, e: vmm_sys_util::errno::Error) -> Self {
        HypervisorError::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// A hypervisor: creates VMs and answers questions about the host's virtualization support.
pub trait Hypervisor: Send + Sync {
    /// Creates a new, empty VM.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves this host can offer a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    /// The largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> u32;
}

/// A guest memory slot: `size` bytes of host memory at `host_addr` appear to the guest at `guest_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// The slot number (unique per VM).
    pub slot: u32,
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the backing mapping.
    pub host_addr: u64,
    /// Whether guest writes fault to the VMM (MMIO exits) instead of writing memory.
    pub readonly: bool,
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A port.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// One entry of the interrupt routing table: writes to GSI `gsi`'s irqfd deliver this MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    /// The global system interrupt number.
    pub gsi: u32,
    /// MSI address.
    pub address: u64,
    /// MSI data.
    pub data: u32,
}

/// A virtual machine.
pub trait Vm: Send + Sync {
    /// Maps (or, with `size == 0`, unmaps) a guest memory slot.
    ///
    /// # Safety
    /// `region.host_addr .. host_addr + size` must be a valid mapping that outlives the slot (until it is removed or
    /// the VM is dropped); the guest will read and write it at any time.
    unsafe fn set_memory_region(&self, region: MemoryRegion) -> Result<()>;
    /// Sets up the x86 interrupt controllers: in-kernel local APICs, with the IOAPIC (`ioapic_pins` pins) left to
    /// user space (KVM's split irqchip).
    fn create_split_irqchip(&self, ioapic_pins: u32) -> Result<()>;
    /// Performs the x86 platform setup hardware virtualization needs (TSS and identity-map pages below 4 GiB).
    /// Hosts that need neither may reject these calls; that is tolerated.
    fn setup_x86_platform(&self, tss_addr: u64, identity_map_addr: u64) -> Result<()>;
    /// Injects a message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> Result<()>;
    /// Creates vCPU `id` (its APIC ID on x86).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Makes a write to `fd` inject GSI `gsi` (as routed by `set_msi_routing`).
    fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// Undoes `register_irqfd`.
    fn unregister_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// Makes a guest write to `addr` signal `fd` inside the kernel, with no exit. With `datamatch`, only 4-byte writes
    /// of that value match; without, writes of any size do.
    fn register_ioevent(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// Undoes `register_ioevent`.
    fn unregister_ioevent(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// Replaces the whole interrupt routing table with these MSI routes.
    fn set_msi_routing(&self, routes: &[MsiRoute]) -> Result<()>;
}

/// Resolves the port and MMIO accesses of a running vCPU.
pub trait ExitHandler {
    /// A port read; `data` arrives zeroed and is filled by the handler.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// An MMIO read; `data` arrives zeroed and is filled by the handler.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// An MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// A port or MMIO access was handled through the `ExitHandler`; run again.
    Handled,
    /// The vCPU executed HLT (only seen without an in-kernel LAPIC).
    Hlt,
    /// The guest triple-faulted (x86 shutdown).
    Shutdown,
    /// The guest asked for a reset through a hypervisor interface.
    Reset,
    /// The guest asked for power-off through a hypervisor interface.
    PowerOff,
    /// The guest sent an EOI for a level-triggered vector routed through the user-space IOAPIC.
    IoapicEoi(u8),
    /// KVM_RUN was interrupted by a signal (or an immediate exit was requested).
    Interrupted,
    /// The guest can take an external interrupt now (asked for with `Vcpu::request_interrupt_window`).
    IrqWindowOpen,
    /// KVM could not run or emulate the guest (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        /// KVM's sub-error code (1 = emulation failure).
        suberror: u32,
        /// Extra words KVM reported.
        data: Vec<u64>,
    },
    /// VM entry failed in hardware.
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
    },
    /// An exit this VMM does not handle.
    Unsupported(String),
}

/// KVM's sub-error code for an instruction the emulator could not handle.
pub const INTERNAL_ERROR_EMULATION: u32 = 1;

/// A virtual CPU. It runs on one thread at a time.
pub trait Vcpu: Send {
    /// Enters the guest until something needs the VMM.
    fn run(&mut self, handler: &dyn ExitHandler) -> Result<VmExit>;
    /// General-purpose registers.
    fn regs(&self) -> Result<StandardRegisters>;
    /// Sets the general-purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    /// Segment, control and descriptor-table registers.
    fn sregs(&self) -> Result<SpecialRegisters>;
    /// Sets the special registers.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// Sets the FPU state.
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    /// Sets model-specific registers; all must be accepted.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Sets the CPUID table the guest sees.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    /// The local APIC state.
    fn lapic(&self) -> Result<LapicState>;
    /// Sets the local APIC state.
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Whether the next `run` returns at once with `VmExit::Interrupted` (used to stop a vCPU without a race).
    fn set_immediate_exit(&mut self, exit: bool);
    /// Where the flag `set_immediate_exit` sets lives, for a signal handler on the vCPU's own thread to set it
    /// (a volatile write of 1): a kick that lands just before the guest is entered then still makes `run` return.
    /// The address stays valid as long as the vCPU; `None` if the hypervisor has no such flag.
    fn immediate_exit_flag(&mut self) -> Option<*mut u8>;
    /// Queues external interrupt `vector` for delivery at the next guest entry: the vector a user-space 8259 PIC
    /// answered the interrupt acknowledge with, delivered through the local APIC's LINT0 (ExtINT). Call it only when
    /// [`Vcpu::ready_for_interrupt_injection`] says so.
    fn inject_external_interrupt(&mut self, vector: u8) -> Result<()>;
    /// Whether, as of the last exit, the guest can take an external interrupt (interrupts enabled, no interrupt
    /// shadow, none queued).
    fn ready_for_interrupt_injection(&mut self) -> bool;
    /// Asks for (or stops asking for) a `VmExit::IrqWindowOpen` as soon as the guest can take an external interrupt.
    fn request_interrupt_window(&mut self, request: bool);
}
