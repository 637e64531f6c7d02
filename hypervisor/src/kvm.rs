//! The KVM backend, built on `kvm-ioctls`.

use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_userspace_memory_region, CpuId, Msrs, KVM_CAP_SPLIT_IRQCHIP,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_bindings::{kvm_interrupt, KVMIO};
use kvm_bindings::{kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::x86_64::{
    CpuIdEntry, FpuState, LapicState, MsrEntry, SpecialRegisters, StandardRegisters,
};
use crate::{
    ExitHandler, Hypervisor, HypervisorError, IoEventAddress, MemoryRegion, MsiRoute, Result, Vcpu,
    Vm, VmExit,
};

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// KVM, opened from /dev/kvm.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens /dev/kvm (close-on-exec) and checks the API version and the capabilities Atrium needs.
    pub fn new() -> Result<Self> {
        let fd = Kvm::open_with_cloexec(true).map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::KvmMissing,
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission,
            _ => HypervisorError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())),
        })?;
        // SAFETY: `fd` was just opened by `open_with_cloexec` and is owned by nobody else.
        let kvm = unsafe { Kvm::from_raw_fd(fd) };
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(HypervisorError::KvmApiVersion(version));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
            (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::CapabilityMissing(name));
            }
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VM", e))?;
        Ok(Arc::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid.as_slice().to_vec())
    }

    fn max_vcpus(&self) -> u32 {
        u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX)
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    unsafe fn set_memory_region(&self, region: MemoryRegion) -> Result<()> {
        let mem = kvm_userspace_memory_region {
            slot: region.slot,
            flags: if region.readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: region.guest_addr,
            memory_size: region.size,
            userspace_addr: region.host_addr,
        };
        // SAFETY: the caller guarantees the host range is a live mapping that outlives the slot.
        unsafe { self.fd.set_user_memory_region(mem) }
            .map_err(|e| HypervisorError::ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_split_irqchip(&self, ioapic_pins: u32) -> Result<()> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(ioapic_pins);
        self.fd
            .enable_cap(&cap)
            .map_err(|e| HypervisorError::ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e))
    }

    fn setup_x86_platform(&self, tss_addr: u64, identity_map_addr: u64) -> Result<()> {
        // VMX needs three pages for a real-mode TSS and one for an identity page table; hosts without VMX (AMD, or
        // KVM backends that don't use VMX) may refuse with EINVAL, which is harmless there.
        let tss = usize::try_from(tss_addr).unwrap_or(usize::MAX);
        match self.fd.set_tss_address(tss) {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {
                tracing::debug!("KVM_SET_TSS_ADDR not supported by this host; continuing");
            }
            Err(e) => return Err(HypervisorError::ioctl("KVM_SET_TSS_ADDR", e)),
        }
        match self.fd.set_identity_map_address(identity_map_addr) {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINVAL => {
                tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR not supported by this host; continuing");
                Ok(())
            }
            Err(e) => Err(HypervisorError::ioctl("KVM_SET_IDENTITY_MAP_ADDR", e)),
        }
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| HypervisorError::ioctl("KVM_SIGNAL_MSI", e))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| HypervisorError::ioctl("KVM_IRQFD", e))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(|e| HypervisorError::ioctl("KVM_IRQFD(deassign)", e))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = kvm_io_address(addr);
        match datamatch {
            Some(value) => self.fd.register_ioevent(fd, &addr, value),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| HypervisorError::ioctl("KVM_IOEVENTFD", e))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = kvm_io_address(addr);
        match datamatch {
            Some(value) => self.fd.unregister_ioevent(fd, &addr, value),
            None => self.fd.unregister_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| HypervisorError::ioctl("KVM_IOEVENTFD(deassign)", e))
    }

    fn set_msi_routing(&self, routes: &[MsiRoute]) -> Result<()> {
        let too_many = || HypervisorError::Ioctl {
            op: "KVM_SET_GSI_ROUTING",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        };
        let mut table = KvmIrqRouting::new(routes.len()).map_err(|_| too_many())?;
        for (slot, route) in table.as_mut_slice().iter_mut().zip(routes) {
            slot.gsi = route.gsi;
            slot.type_ = KVM_IRQ_ROUTING_MSI;
            slot.u.msi = kvm_irq_routing_msi {
                address_lo: route.address as u32,
                address_hi: (route.address >> 32) as u32,
                data: route.data,
                ..Default::default()
            };
        }
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_GSI_ROUTING", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

fn kvm_io_address(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(port) => kvm_ioctls::IoEventAddress::Pio(port),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
}

impl KvmVcpu {
    fn internal_error(&mut self) -> VmExit {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union: this is only called right after KVM_RUN
        // returned KVM_EXIT_INTERNAL_ERROR.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        VmExit::InternalError {
            suberror: internal.suberror,
            data: internal.data[..count].to_vec(),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, handler: &dyn ExitHandler) -> Result<VmExit> {
        // Port I/O is handled after the match, once the exit's borrow of the run area has ended, because a string
        // instruction (`rep insb`, `rep outsw`...) needs the access size, which only the run structure holds.
        let mut port_io = None;
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                port_io = Some((port, data.as_mut_ptr(), data.len(), true));
                VmExit::Handled
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                port_io = Some((port, data.as_ptr().cast_mut(), data.len(), false));
                VmExit::Handled
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0);
                handler.mmio_read(addr, data);
                VmExit::Handled
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                handler.mmio_write(addr, data);
                VmExit::Handled
            }
            Ok(VcpuExit::Hlt) => VmExit::Hlt,
            Ok(VcpuExit::Shutdown) => VmExit::Shutdown,
            Ok(VcpuExit::IoapicEoi(vector)) => VmExit::IoapicEoi(vector),
            Ok(VcpuExit::Intr) => VmExit::Interrupted,
            Ok(VcpuExit::IrqWindowOpen) => VmExit::IrqWindowOpen,
            Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                VmExit::PowerOff
            }
            Ok(VcpuExit::FailEntry(reason, _)) => VmExit::FailEntry { reason },
            Ok(VcpuExit::InternalError) => return Ok(self.internal_error()),
            Ok(other) => VmExit::Unsupported(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VmExit::Interrupted,
            Err(e) => return Err(HypervisorError::ioctl("KVM_RUN", e)),
        };
        if let Some((port, ptr, len, is_in)) = port_io {
            // SAFETY: KVM_RUN just returned KVM_EXIT_IO, so `io` is the exit union's active member.
            let size =
                usize::from(unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io.size }).max(1);
            // SAFETY: `ptr..ptr+len` is the I/O data area kvm-ioctls sliced from this vCPU's run mapping, which lives as
            // long as `self.fd`; it lies past the `kvm_run` structure (at `io.data_offset`), so the reference to the
            // structure taken above does not overlap it, and no other reference to it exists now.
            let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            // One access per element: `count` accesses of `size` bytes each.
            for element in data.chunks_mut(size) {
                if is_in {
                    element.fill(0);
                    handler.pio_read(port, element);
                } else {
                    handler.pio_write(port, element);
                }
            }
        }
        Ok(exit)
    }

    fn regs(&self) -> Result<StandardRegisters> {
        self.fd
            .get_regs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_REGS", e))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(regs)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        self.fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_SREGS", e))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_FPU", e))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let wrapper = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_MSRS",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        let set = self
            .fd
            .set_msrs(&wrapper)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_MSRS", e))?;
        if set != msrs.len() {
            let index = msrs.get(set).map(|m| m.index).unwrap_or_default();
            return Err(HypervisorError::Ioctl {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("KVM refused MSR {index:#x}")),
            });
        }
        Ok(())
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CPUID2", e))
    }

    fn lapic(&self) -> Result<LapicState> {
        self.fd
            .get_lapic()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_LAPIC", e))
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        self.fd
            .set_lapic(lapic)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_LAPIC", e))
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn immediate_exit_flag(&mut self) -> Option<*mut u8> {
        // The run structure is mapped for the vCPU's whole life.
        Some(std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit))
    }

    fn inject_external_interrupt(&mut self, vector: u8) -> Result<()> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer, which refers to a live local of exactly
        // that type; the vCPU descriptor is owned by `self.fd` and open.
        let rc = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if rc < 0 {
            return Err(HypervisorError::Ioctl {
                op: "KVM_INTERRUPT",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn ready_for_interrupt_injection(&mut self) -> bool {
        self.fd.get_kvm_run().ready_for_interrupt_injection != 0
    }

    fn request_interrupt_window(&mut self, request: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(request);
    }
}

// kvm-ioctls has no wrapper for KVM_INTERRUPT (only needed with a user-space PIC), so it is declared here from the
// KVM API: _IOW(KVMIO, 0x86, struct kvm_interrupt).
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
