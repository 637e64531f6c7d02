//! One boot of a VM: the builder recipe that assembles it, and the control loop that runs it until it stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arch::BootSetup;
use hypervisor::{Hypervisor, Vcpu};

use crate::config::{
    DiskImageFormat, HotplugMethod, TripleFaultAction, VmConfig, DEFAULT_BOOT_TIMEOUT,
};
use crate::console::Console;
use crate::cpu::{self, BootEntry, CpuError, VcpuContext, VcpuEvent, VcpuHandle};
use crate::device_manager::{DeviceError, DeviceManager, DeviceSetup, IOAPIC_PINS};
use crate::events::VmEvents;
use crate::firmware::{self, FirmwareError};
use crate::io::IoDispatch;
use crate::memory::{MemoryError, MemoryManager};
use crate::payload::{self, PayloadError};

/// Where KVM may put the three-page real-mode TSS that VMX needs (inside the 32-bit MMIO gap, unused by devices).
const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Where KVM may put the identity-map page VMX needs (just below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors while building a VM; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Creating the KVM VM or its interrupt controllers failed.
    #[error("cannot create the VM: {0}")]
    CreateVm(#[source] hypervisor::HypervisorError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, command line or initramfs.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The firmware image or what it is told.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    /// MP or ACPI tables, or the zero page.
    #[error("cannot write the boot tables: {0}")]
    BootTables(String),
    /// vCPUs.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A disk image.
    #[error("{0}")]
    Disk(String),
    /// The entropy source.
    #[error("{0}")]
    Rng(String),
    /// A network device.
    #[error("{0}")]
    Net(String),
    /// The virtio console.
    #[error("--console: {0}")]
    Console(String),
    /// The vsock device.
    #[error("--vsock: {0}")]
    Vsock(String),
    /// The debug console's output.
    #[error("--debug-console: {0}")]
    DebugConsole(String),
}

/// A built VM. Fields drop in order: vCPU threads are joined before devices, the KVM VM and guest memory go away.
pub struct Vm {
    vcpu_threads: Vec<VcpuHandle>,
    pending_vcpus: Vec<(u32, Box<dyn Vcpu>)>,
    parked_vcpus: Vec<(u32, Box<dyn Vcpu>)>,
    guest_mem: virtio_devices::GuestMemory,
    console_input: Option<virtio_devices::ConsoleInput>,
    /// Hot-pluggable memory: where the area starts, how large it may grow, and what was added (slot, base, size).
    memory_hotplug: (u64, u64, Vec<(u32, u64, u64)>),
    /// The virtio-mem device (`hotplug_method=virtio-mem`): its name and the handle on its requested size.
    virtio_mem: Option<(String, virtio_devices::VirtioMemHandle)>,
    memory_slots: u32,
    /// Firmware boots: whether the firmware said it found nothing to boot.
    boot_watch: Option<firmware::BootWatch>,
    base_cpuid: Vec<hypervisor::x86_64::CpuIdEntry>,
    max_vcpus: u32,
    devices: DeviceManager,
    context: Arc<VcpuContext>,
    hypervisor_vm: Arc<dyn hypervisor::Vm>,
    memory: MemoryManager,
}

impl Vm {
    /// Builds a VM from `config`, ready to start. The recipe, in order: VM and interrupt controllers, guest memory,
    /// payload, platform devices, virtio devices on PCI, platform tables, boot parameters, vCPUs (created, not yet
    /// running).
    pub fn build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        console: &Console,
        cmos_state: Option<devices::cmos::CmosState>,
        events: Arc<VmEvents>,
        host: &HostResources,
    ) -> Result<Vm, BuildError> {
        let (eject_event, vconsole, net_fds) = (host.eject_event, host.vconsole, host.net_fds);
        // 1. The VM, with KVM's local APICs and a user-space IOAPIC (split irqchip).
        let vm = hv.create_vm().map_err(BuildError::CreateVm)?;
        vm.setup_x86_platform(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS)
            .map_err(BuildError::CreateVm)?;
        vm.create_split_irqchip(IOAPIC_PINS)
            .map_err(BuildError::CreateVm)?;

        // 2. Guest RAM, and the firmware image when booting through firmware.
        let mut memory = MemoryManager::new(&vm, config.memory.size)?;
        if let Some(fw) = &config.firmware {
            let image = firmware::load_image(&fw.path)?;
            firmware::install(&vm, &mut memory, &image)?;
        }
        let mem = memory.guest_memory();

        // 3. Kernel, command line, initramfs (firmware finds its own boot loader on the disks).
        let loaded = match config.firmware {
            Some(_) => None,
            None => Some(payload::load(mem, &config.payload, guests::DEMO)?),
        };
        // The virtio-mem region, after the payload (which belongs in boot RAM); the device comes with the others.
        let virtio_mem_region = match config.memory.hotplug_method {
            HotplugMethod::VirtioMem if config.memory.hotplug_size > 0 => {
                let base = memory_hotplug_base(memory.ram_size());
                let size = config.memory.hotplug_size;
                let discard = memory.add_virtio_mem_region(&vm, base, size)?;
                Some((base, size, discard))
            }
            _ => None,
        };
        let mem = memory.guest_memory();

        // 4. Devices.
        let ram = memory.ram_size();
        let memory_slots = if config.memory.hotplug_size > 0
            && config.memory.hotplug_method == HotplugMethod::Acpi
        {
            MEMORY_HOTPLUG_SLOTS
        } else {
            0
        };
        let below_4g = ram.min(arch::layout::MEM_32BIT_GAP_START);
        let devices = DeviceManager::new(
            &vm,
            events.clone(),
            DeviceSetup {
                serial_out: console.enabled().then(|| console.writer()),
                mem_below_4g: below_4g,
                mem_above_4g: ram - below_4g,
                cmos_state,
                debug_exit: config.debug_exit,
                cpus: (config.cpus.boot_vcpus, config.cpus.max_vcpus),
                memory_slots,
                eject_event: eject_event
                    .try_clone()
                    .map_err(|e| BuildError::BootTables(e.to_string()))?,
            },
        )?;

        // 5. Virtio devices on PCI: disks first (in the order given), then the entropy device.
        let mut devices = devices;
        let guest_mem = virtio_devices::GuestMemory::new(mem.clone());
        let mut boot_disks = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let name = disk.id.clone().unwrap_or_else(|| format!("disk{index}"));
            let block = create_block(disk)?;
            if disk.bootindex.is_some() {
                devices.mark_boot_device(&name);
            }
            let slot = devices.add_virtio(name, &guest_mem, block)?;
            if let Some(bootindex) = disk.bootindex {
                boot_disks.push((bootindex, slot));
            }
        }
        boot_disks.sort();
        for (index, net) in config.nets.iter().enumerate() {
            let name = net.id.clone().unwrap_or_else(|| format!("net{index}"));
            let device = create_net(net, net_fds)?;
            devices.add_virtio(name, &guest_mem, device)?;
        }
        let mut console_input = None;
        if let Some(host) = vconsole {
            let device = virtio_devices::Console::new(Box::new(host.writer()))
                .map_err(|e| BuildError::Console(e.to_string()))?;
            console_input = Some(device.input());
            devices.add_virtio("console0".to_string(), &guest_mem, Box::new(device))?;
        }
        if let Some(vsock) = &config.vsock {
            let name = vsock.id.clone().unwrap_or_else(|| "vsock0".to_string());
            devices.add_virtio(name, &guest_mem, create_vsock(vsock)?)?;
        }
        if let Some(rng) = &config.rng {
            let source = if rng.src.as_os_str() == "/dev/urandom" {
                virtio_devices::RngSource::Getrandom
            } else {
                virtio_devices::RngSource::File(rng.src.clone())
            };
            let device = virtio_devices::Rng::new(&source)
                .map_err(|e| BuildError::Rng(format!("--rng src={}: {e}", rng.src.display())))?;
            devices.add_virtio("rng0".to_string(), &guest_mem, Box::new(device))?;
        }
        let virtio_mem = match virtio_mem_region {
            Some((addr, region_size, discard)) => Some(add_virtio_mem(
                &mut devices,
                &guest_mem,
                addr,
                region_size,
                discard,
            )?),
            None => None,
        };

        // The firmware debug console, and (firmware boots) the watch for "nothing to boot".
        let mut boot_watch = None;
        let debug_out = debug_console_output(config)?;
        let debug_out: Option<Box<dyn std::io::Write + Send>> = match (&config.firmware, debug_out)
        {
            (Some(_), out) => {
                let watch = firmware::BootWatch::default();
                boot_watch = Some(watch.clone());
                let inner = out.unwrap_or_else(|| Box::new(std::io::sink()));
                Some(Box::new(firmware::WatchedOutput::new(inner, watch)))
            }
            (None, out) => out,
        };
        if let Some(out) = debug_out {
            devices.add_debug_console(out)?;
        }

        // 6. Platform tables the guest discovers CPUs and interrupts from: written here for a kernel, handed to the
        //    firmware through fw_cfg otherwise (it builds its own MP table and installs Atrium's ACPI tables).
        let boot_cpus = config.cpus.boot_vcpus;
        let max_cpus = config.cpus.max_vcpus;
        let Some(loaded) = loaded else {
            let fw = config
                .firmware
                .as_ref()
                .map_or(DEFAULT_BOOT_TIMEOUT, |f| f.boot_timeout);
            let fw_cfg = firmware::fw_cfg(
                mem,
                &firmware::FwCfgSetup {
                    cpus: (boot_cpus, max_cpus),
                    ram: (below_4g, ram - below_4g),
                    memory_slots,
                    boot_order: boot_disks.iter().map(|(_, slot)| *slot).collect(),
                    serial_port: console.enabled().then_some(firmware::SERCON_PORT),
                    boot_fail_wait_ms: fw.saturating_mul(1000),
                },
            )?;
            devices.add_legacy_pc(events.clone())?;
            // Disks only: without a bootindex the firmware tries the first hard disk (not a floppy drive first).
            devices.set_boot_sequence(&[devices::cmos::CmosBootDevice::HardDisk]);
            devices.add_io_device(
                Arc::new(std::sync::Mutex::new(fw_cfg)),
                u64::from(devices::fw_cfg::FW_CFG_PORT),
                devices::fw_cfg::FW_CFG_PORT_LEN,
                "fw_cfg",
            )?;
            return Self::finish_build(
                hv,
                config,
                &vm,
                memory,
                devices,
                guest_mem,
                console_input,
                memory_slots,
                events,
                None,
            )
            .map(|vm| vm.with_boot_watch(boot_watch).with_virtio_mem(virtio_mem));
        };
        match arch::mptable::setup_mptable(mem, boot_cpus) {
            Ok(()) => {}
            // The legacy MP table has room for a few dozen CPUs; larger guests find them through ACPI alone.
            Err(e @ arch::mptable::Error::TooManyCpus { .. }) => {
                tracing::warn!("no MP table: {e}");
            }
            Err(e) => return Err(BuildError::BootTables(e.to_string())),
        }
        let rsdp = arch::acpi::create_acpi_tables(mem, boot_cpus, max_cpus, ram, memory_slots)
            .map_err(|e| BuildError::BootTables(e.to_string()))?;

        // 7. Boot parameters (zero page or PVH start info).
        arch::configure_system(
            mem,
            &BootSetup {
                protocol: loaded.protocol,
                cmdline_addr: loaded.cmdline.0,
                cmdline_size: loaded.cmdline.1,
                initramfs: loaded.initramfs,
                setup_header: loaded.setup_header,
                rsdp_addr: Some(rsdp),
                ram_size: ram,
            },
        )
        .map_err(|e| BuildError::BootTables(e.to_string()))?;

        let boot = BootEntry {
            entry: loaded.entry,
            protocol: loaded.protocol,
        };
        Self::finish_build(
            hv,
            config,
            &vm,
            memory,
            devices,
            guest_mem,
            console_input,
            memory_slots,
            events,
            Some(boot),
        )
        .map(|vm| vm.with_virtio_mem(virtio_mem))
    }

    /// The recipe's last step, shared by kernel and firmware boots: the vCPUs (the boot vCPU at the kernel's entry,
    /// or in its reset state at the firmware's reset vector; the others waiting for the guest's INIT/SIPI).
    #[allow(clippy::too_many_arguments)]
    fn finish_build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        vm: &Arc<dyn hypervisor::Vm>,
        memory: MemoryManager,
        devices: DeviceManager,
        guest_mem: virtio_devices::GuestMemory,
        console_input: Option<virtio_devices::ConsoleInput>,
        memory_slots: u32,
        events: Arc<VmEvents>,
        boot: Option<BootEntry>,
    ) -> Result<Vm, BuildError> {
        let vm = vm.clone();
        let mem = memory.guest_memory();
        let ram = memory.ram_size();
        let boot_cpus = config.cpus.boot_vcpus;
        let max_cpus = config.cpus.max_vcpus;
        // 8. vCPUs.
        let base_cpuid = hv.supported_cpuid().map_err(BuildError::CreateVm)?;
        let mut pending_vcpus = Vec::new();
        for id in 0..boot_cpus {
            let vcpu = cpu::create_vcpu(
                &vm,
                id,
                max_cpus,
                &base_cpuid,
                mem,
                boot.as_ref().filter(|_| id == 0),
            )?;
            pending_vcpus.push((id, vcpu));
        }

        let io = Arc::new(IoDispatch::new(
            devices.io_bus().clone(),
            devices.mmio_bus().clone(),
        ));
        let context = Arc::new(VcpuContext {
            io,
            events: events.clone(),
            ioapic: devices.ioapic().clone(),
            triple_fault_resets: config.triple_fault == TripleFaultAction::Reboot,
            extint: devices.extint(),
            boot_vcpu_kicker: devices.boot_vcpu_kicker().clone(),
        });
        Ok(Vm {
            vcpu_threads: Vec::new(),
            pending_vcpus,
            parked_vcpus: Vec::new(),
            guest_mem,
            console_input,
            memory_hotplug: (
                memory_hotplug_base(ram),
                config.memory.hotplug_size,
                Vec::new(),
            ),
            memory_slots,
            virtio_mem: None,
            boot_watch: None,
            base_cpuid,
            max_vcpus: max_cpus,
            devices,
            context,
            hypervisor_vm: vm,
            memory,
        })
    }

    fn with_boot_watch(mut self, watch: Option<firmware::BootWatch>) -> Self {
        self.boot_watch = watch;
        self
    }

    fn with_virtio_mem(
        mut self,
        virtio_mem: Option<(String, virtio_devices::VirtioMemHandle)>,
    ) -> Self {
        self.virtio_mem = virtio_mem;
        self
    }

    /// Whether the firmware reported that it found nothing to boot.
    pub fn firmware_found_nothing_to_boot(&self) -> bool {
        self.boot_watch
            .as_ref()
            .is_some_and(firmware::BootWatch::no_bootable_device)
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), CpuError> {
        for (id, vcpu) in self.pending_vcpus.drain(..) {
            self.vcpu_threads
                .push(cpu::spawn_vcpu(id, vcpu, self.context.clone())?);
        }
        Ok(())
    }

    /// The CMOS state, to carry across a guest reboot.
    pub fn cmos_state(&self) -> devices::cmos::CmosState {
        self.devices.cmos_state()
    }

    /// Accesses no device claimed so far: (port, MMIO).
    pub fn unclaimed_accesses(&self) -> (u64, u64) {
        let u = &self.context.io.unclaimed;
        (
            u.pio.load(Ordering::Relaxed),
            u.mmio.load(Ordering::Relaxed),
        )
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        for handle in self.vcpu_threads.drain(..) {
            let _ = handle.finish();
        }
    }

    /// Creates (or reuses a parked) vCPU `id` at run time and starts its thread; it waits for the guest's INIT/SIPI.
    pub fn hotplug_vcpu(&mut self, id: u32) -> Result<(), CpuError> {
        if self.vcpu_threads.iter().any(|h| h.id() == id) {
            return Ok(());
        }
        let vcpu = match self.parked_vcpus.iter().position(|(pid, _)| *pid == id) {
            Some(pos) => self.parked_vcpus.remove(pos).1,
            None => cpu::create_vcpu(
                &self.hypervisor_vm,
                id,
                self.max_vcpus,
                &self.base_cpuid,
                self.memory.guest_memory(),
                None,
            )?,
        };
        self.vcpu_threads
            .push(cpu::spawn_vcpu(id, vcpu, self.context.clone())?);
        Ok(())
    }

    /// Hot-adds a disk: the device goes on the PCI bus and the guest is told through ACPI. Returns its name and slot.
    pub fn hotplug_disk(
        &mut self,
        disk: &crate::config::DiskConfig,
    ) -> Result<(String, u8), BuildError> {
        disk.validate()
            .map_err(|e| BuildError::Disk(e.to_string()))?;
        let name = match &disk.id {
            Some(id) => id.clone(),
            None => self.free_name("disk"),
        };
        let block = create_block(disk)?;
        let slot = self
            .devices
            .hotplug_virtio(name.clone(), &self.guest_mem, block)?;
        Ok((name, slot))
    }

    /// Grows guest RAM to `desired` bytes: by adding one ACPI memory device (which cannot shrink again), or with
    /// virtio-mem by asking the driver to plug or unplug blocks until boot RAM plus plugged memory is `desired`.
    pub fn resize_memory(&mut self, desired: u64) -> Result<(), String> {
        if let Some((name, handle)) = &self.virtio_mem {
            let boot = self.memory.ram_size();
            let Some(requested) = desired.checked_sub(boot) else {
                return Err(format!(
                    "desired_ram={desired} is below the boot memory ({boot} bytes), which virtio-mem cannot remove"
                ));
            };
            handle
                .set_requested_size(requested)
                .map_err(|e| format!("desired_ram={desired}: {e}"))?;
            // The driver learns of it from the configuration-change interrupt, and answers with requests.
            if !self.devices.virtio_config_changed(name) {
                return Err(format!("the virtio-mem device '{name}' is gone"));
            }
            return Ok(());
        }
        let current = self.memory.ram_size();
        if desired == current {
            return Ok(());
        }
        if desired < current {
            return Err(format!(
                "desired_ram={desired} is below the current {current}; removing memory is not supported yet"
            ));
        }
        let delta = desired - current;
        let (area_base, area_size, added) = &self.memory_hotplug;
        let used: u64 = added.iter().map(|(_, _, size)| size).sum();
        if !delta.is_multiple_of(crate::config::MEMORY_HOTPLUG_ALIGNMENT) {
            return Err(format!(
                "desired_ram must grow memory in multiples of 128 MiB (asked for {delta} more bytes)"
            ));
        }
        if used + delta > *area_size {
            return Err(format!(
                "desired_ram={desired} needs {delta} more bytes but only {} of hotplug_size are left",
                area_size - used
            ));
        }
        let slot = added.len() as u32;
        if slot >= self.memory_slots {
            return Err("every memory hotplug slot is in use".to_string());
        }
        let base = area_base + used;
        let memory = self
            .memory
            .hotplug(&self.hypervisor_vm, base, delta)
            .map_err(|e| e.to_string())?;
        // Devices doing DMA see the new memory from now on.
        match self.guest_mem.lock() {
            Ok(guard) => guard.replace(memory),
            Err(_) => return Err("guest memory map lock poisoned".to_string()),
        }
        self.memory_hotplug.2.push((slot, base, delta));
        self.devices
            .memory_added(slot, base, delta)
            .map_err(|e| e.to_string())
    }

    /// Hot-adds a network device on a tap. Returns its name and slot.
    pub fn hotplug_net(
        &mut self,
        net: &crate::config::NetConfig,
    ) -> Result<(String, u8), BuildError> {
        let name = match &net.id {
            Some(id) => id.clone(),
            None => self.free_name("net"),
        };
        let device = create_net(net, &NetFds::new())?;
        let slot = self
            .devices
            .hotplug_virtio(name.clone(), &self.guest_mem, device)?;
        Ok((name, slot))
    }

    /// Hot-adds the vsock device. Returns its name and slot.
    pub fn hotplug_vsock(
        &mut self,
        vsock: &crate::config::VsockConfig,
    ) -> Result<(String, u8), BuildError> {
        if self
            .devices
            .virtio_devices()
            .any(|(n, _)| n.starts_with("vsock"))
        {
            return Err(BuildError::Vsock(
                "the VM has a vsock device already; remove it first".into(),
            ));
        }
        let name = vsock.id.clone().unwrap_or_else(|| self.free_name("vsock"));
        let device = create_vsock(vsock)?;
        let slot = self
            .devices
            .hotplug_virtio(name.clone(), &self.guest_mem, device)?;
        Ok((name, slot))
    }

    /// The first `<prefix><n>` no device uses.
    fn free_name(&self, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| !self.devices.virtio_devices().any(|(d, _)| d == n))
            .unwrap_or_default()
    }

    /// Stops vCPU `id`'s thread and parks the vCPU (after the guest ejected it).
    pub fn unplug_vcpu(&mut self, id: u32) {
        if let Some(pos) = self.vcpu_threads.iter().position(|h| h.id() == id) {
            let handle = self.vcpu_threads.remove(pos);
            if let Some(vcpu) = handle.finish() {
                self.parked_vcpus.push((id, vcpu));
            }
        }
    }

    /// The ids of the vCPUs with running threads.
    pub fn vcpu_ids(&self) -> Vec<u32> {
        self.vcpu_threads.iter().map(|h| h.id()).collect()
    }

    /// Pauses every vCPU (they stop entering the guest).
    pub fn pause(&self) {
        for handle in &self.vcpu_threads {
            let _ = handle.send(VcpuEvent::Pause);
        }
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        for handle in &self.vcpu_threads {
            let _ = handle.send(VcpuEvent::Resume);
        }
    }

    /// Number of vCPUs running.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_threads.len() + self.pending_vcpus.len()
    }

    /// Guest RAM in bytes: boot RAM, ACPI-added memory and the memory the virtio-mem driver has plugged.
    pub fn ram_size(&self) -> u64 {
        let plugged = self
            .virtio_mem
            .as_ref()
            .map_or(0, |(_, handle)| handle.plugged_size());
        self.memory.ram_size() + plugged
    }

    /// Whether `name` is the virtio-mem device (which is never hot-removed: memory shrinks through `vm.resize`).
    pub fn is_virtio_mem(&self, name: &str) -> bool {
        self.virtio_mem.as_ref().is_some_and(|(n, _)| n == name)
    }

    /// The devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The devices, mutable (hotplug).
    pub fn devices_mut(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// Queues console input for the virtio console.
    pub fn feed_virtio_console(&self, bytes: &[u8]) {
        if let Some(input) = &self.console_input {
            if let Err(e) = input.enqueue_input(bytes) {
                tracing::debug!("virtio console input dropped: {e}");
            }
        }
    }

    /// Queues console input for the serial port.
    pub fn feed_serial(&self, bytes: &[u8]) {
        if let Some(serial) = self.devices.serial() {
            let mut serial = serial.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = serial.enqueue_input(bytes) {
                tracing::debug!("serial input dropped: {e}");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A virtio-vsock device whose host side is a Unix socket.
fn create_vsock(
    vsock: &crate::config::VsockConfig,
) -> Result<Box<dyn virtio_devices::VirtioDevice>, BuildError> {
    let device = virtio_devices::Vsock::new(u64::from(vsock.cid), &vsock.socket)
        .map_err(|e| BuildError::Vsock(e.to_string()))?;
    Ok(Box::new(device))
}

/// What a VM borrows from the VMM that outlives it (across reboots).
pub struct HostResources<'a> {
    /// Signalled when the guest ejects a CPU or device.
    pub eject_event: &'a vmm_sys_util::eventfd::EventFd,
    /// The virtio console's host side, if there is one.
    pub vconsole: Option<&'a Console>,
    /// Inherited tap descriptors.
    pub net_fds: &'a NetFds,
}

/// Tap descriptors inherited from the parent process, by number (see [`claim_net_fds`]).
pub type NetFds = std::collections::BTreeMap<i32, std::os::fd::OwnedFd>;

/// Takes ownership of the tap descriptors `--net fd=N` names. Must run before the VMM opens anything, so a number
/// that was not open at start cannot alias a descriptor of our own.
pub fn claim_net_fds(config: &VmConfig) -> Result<NetFds, BuildError> {
    use std::os::fd::FromRawFd;
    let mut fds = NetFds::new();
    for fd in config.nets.iter().filter_map(|n| n.fd) {
        if fds.contains_key(&fd) {
            return Err(BuildError::Net(format!(
                "--net fd={fd}: the same descriptor is named twice"
            )));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF when `fd` is not open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(BuildError::Net(format!(
                "--net fd={fd}: descriptor {fd} is not open; pass the tap's descriptor to atrium"
            )));
        }
        // SAFETY: `fd` is open (checked above) and was inherited from the parent, which handed it to us by naming it;
        // nothing else in this process owns it, since this runs before the VMM opens any descriptor.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a descriptor we own; keeps it from leaking into programs we might start.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        fds.insert(fd, owned);
    }
    Ok(fds)
}

/// ACPI memory hotplug slots when `hotplug_size` is set.
const MEMORY_HOTPLUG_SLOTS: u32 = 8;

/// Puts the virtio-mem device for the region at `addr` on the PCI bus, under the first free `mem<n>` name.
fn add_virtio_mem(
    devices: &mut DeviceManager,
    guest_mem: &virtio_devices::GuestMemory,
    addr: u64,
    region_size: u64,
    discard: Arc<dyn virtio_devices::MemoryDiscard>,
) -> Result<(String, virtio_devices::VirtioMemHandle), BuildError> {
    let geometry = virtio_devices::VirtioMemGeometry {
        addr,
        region_size,
        block_size: virtio_devices::VIRTIO_MEM_BLOCK_SIZE,
        node_id: 0,
    };
    let device = virtio_devices::VirtioMem::new(geometry, discard).map_err(|e| {
        BuildError::Memory(MemoryError::VirtioMem {
            base: addr,
            size: region_size,
            reason: e.to_string(),
        })
    })?;
    let handle = device.handle();
    let name = (0..)
        .map(|i| format!("mem{i}"))
        .find(|n| !devices.virtio_devices().any(|(d, _)| d == n))
        .unwrap_or_default();
    devices.add_virtio(name.clone(), guest_mem, Box::new(device))?;
    Ok((name, handle))
}

/// Hot-added memory goes above the PCI 64-bit window, so neither has to move when the other grows.
fn memory_hotplug_base(ram: u64) -> u64 {
    let (window, size) = arch::layout::pci_mmio64_window(ram);
    window + size
}

/// A virtio-net device on the tap `net` names (or a new one, or the inherited descriptor in `fds`).
fn create_net(
    net: &crate::config::NetConfig,
    fds: &NetFds,
) -> Result<Box<dyn virtio_devices::VirtioDevice>, BuildError> {
    if let Some(fd) = net.fd {
        let err = |e: String| BuildError::Net(format!("--net fd={fd}: {e}"));
        let owned = fds
            .get(&fd)
            .ok_or_else(|| err("the descriptor was not passed to atrium at start".into()))?
            .try_clone()
            .map_err(|e| err(e.to_string()))?;
        let tap = virtio_devices::Tap::from_fd(owned).map_err(|e| err(e.to_string()))?;
        let device = virtio_devices::Net::with_taps(vec![tap], net.mac, net.queue_size)
            .map_err(|e| err(e.to_string()))?;
        return Ok(Box::new(device));
    }
    let options = virtio_devices::NetOptions {
        tap: net.tap.clone(),
        mac: net.mac,
        num_queues: net.num_queues,
        queue_size: net.queue_size,
    };
    let device = virtio_devices::Net::new(&options).map_err(|e| {
        BuildError::Net(format!(
            "--net tap={}: {e}",
            net.tap.as_deref().unwrap_or("")
        ))
    })?;
    Ok(Box::new(device))
}

/// A virtio-blk device for `disk` (image opened and locked).
fn create_block(
    disk: &crate::config::DiskConfig,
) -> Result<Box<dyn virtio_devices::VirtioDevice>, BuildError> {
    let disk_err =
        |e: String| BuildError::Disk(format!("--disk path={}: {e}", disk.path.display()));
    let backend: Arc<dyn virtio_devices::DiskBackend> = match disk.format {
        Some(DiskImageFormat::Raw) => Arc::new(
            virtio_devices::RawFile::open(&disk.path, disk.readonly)
                .map_err(|e| disk_err(e.to_string()))?,
        ),
        // The operator said qcow2: its header (and so its backing chain) is theirs, not the guest's.
        Some(DiskImageFormat::Qcow2) => Arc::new(
            virtio_devices::Qcow2File::open_with_backing(&disk.path, disk.readonly)
                .map_err(|e| disk_err(e.to_string()))?,
        ),
        // Detected: a raw image a guest wrote a qcow2 header into must not reach host files, so no backing chain.
        None => {
            let format = detect_disk_format(&disk.path).map_err(|e| disk_err(e.to_string()))?;
            virtio_devices::open_disk(&disk.path, format, disk.readonly)
                .map_err(|e| disk_err(e.to_string()))?
        }
    };
    let options = virtio_devices::BlockOptions {
        serial: disk.serial.clone().unwrap_or_default(),
        num_queues: disk.num_queues,
        queue_size: disk.queue_size,
    };
    let block =
        virtio_devices::Block::new(backend, &options).map_err(|e| disk_err(e.to_string()))?;
    Ok(Box::new(block))
}

/// The format of a disk image given without `format=`: qcow2 if it starts with the qcow2 magic, raw otherwise.
fn detect_disk_format(path: &std::path::Path) -> std::io::Result<virtio_devices::DiskFormat> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        virtio_devices::DiskFormat::Qcow2
    } else {
        virtio_devices::DiskFormat::Raw
    })
}

/// Where the debug console (port 0x402) writes, if it was asked for.
fn debug_console_output(
    config: &VmConfig,
) -> Result<Option<Box<dyn std::io::Write + Send>>, BuildError> {
    use crate::config::ConsoleOutputMode;
    match &config.debug_console {
        None | Some(ConsoleOutputMode::Off) => Ok(None),
        Some(ConsoleOutputMode::Null) => Ok(Some(Box::new(std::io::sink()))),
        Some(ConsoleOutputMode::File(path)) => {
            let file = std::fs::File::create(path).map_err(|e| {
                BuildError::DebugConsole(format!("cannot create {}: {e}", path.display()))
            })?;
            Ok(Some(Box::new(file)))
        }
        Some(ConsoleOutputMode::Tty) => Ok(Some(Box::new(std::io::stderr()))),
        Some(ConsoleOutputMode::Socket(_)) => Err(BuildError::DebugConsole(
            "a socket is not supported here; use off, null, tty or file=PATH".to_string(),
        )),
    }
}
