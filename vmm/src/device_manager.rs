//! Creates the platform devices and places them on the port and MMIO buses.
//!
//! The device manager owns the devices; the buses only hold weak references, so removing a device here is enough
//! to take it off the bus.

use std::sync::{Arc, Mutex};

use devices::acpi::AcpiPmDevice;
use devices::cmos::Cmos;
use devices::cpu_hotplug::{CPU_HOTPLUG_MMIO_BASE, CPU_HOTPLUG_MMIO_LEN};
use devices::debug_exit::DebugExit;
use devices::ged::{GED_IRQ, GED_MMIO_BASE, GED_MMIO_LEN};
use devices::i8042::I8042;
use devices::ioapic::Ioapic;
use devices::pci_hotplug::{PCI_HOTPLUG_MMIO_BASE, PCI_HOTPLUG_MMIO_LEN};
use devices::port80::Port80;
use devices::serial::Serial;
use devices::{
    Bus, BusDevice, CpuHotplugController, Ged, GedEvent, MsiSender, PciHotplugController,
    PlatformEvents,
};
use hypervisor::Vm;
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleWriter;
use crate::cpu::VcpuKicker;
use crate::interrupts::{MsiRouter, PciIntx};
use crate::legacy::LegacyPc;
use crate::pci_segment::{PciSegment, PciSegmentError};
use crate::virtio::{add_virtio_pci_device, VirtioError, VirtioPciHandle};

/// COM1's ports.
const COM1_PORT: u64 = 0x3f8;
/// COM1's IOAPIC pin.
const COM1_IRQ: usize = 4;
/// The i8042's data port.
const I8042_DATA_PORT: u64 = 0x60;
/// The i8042's command/status port.
const I8042_COMMAND_PORT: u64 = 0x64;
/// The firmware debug console.
const DEBUG_CONSOLE_PORT: u64 = 0x402;
/// CMOS index/data ports.
const CMOS_PORT: u64 = 0x70;
/// POST code port.
const PORT80: u64 = 0x80;
/// The debug-exit port.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// IOAPIC MMIO window length.
const IOAPIC_LEN: u64 = 0x1000;
/// IOAPIC pins (also told to KVM for the split irqchip).
pub const IOAPIC_PINS: u32 = 24;

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Two devices claimed overlapping ranges (a bug in the device layout).
    #[error("cannot place {name} on the bus: {source}")]
    Bus {
        /// The device.
        name: &'static str,
        /// The bus error.
        #[source]
        source: devices::BusError,
    },
    /// The PCI segment.
    #[error(transparent)]
    Pci(#[from] PciSegmentError),
    /// A legacy PC device (PIC, PIT) could not be created.
    #[error("cannot create the legacy PC devices: {0}")]
    Legacy(String),
    /// A hotplug controller.
    #[error("hotplug: {0}")]
    Hotplug(String),
    /// A virtio device.
    #[error("{name}: {source}")]
    Virtio {
        /// Which device.
        name: String,
        /// What failed.
        #[source]
        source: VirtioError,
    },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The IOAPIC's outputs: MSIs sent through the hypervisor, and its pins' messages mirrored into the routing table.
struct IoapicMsi {
    vm: Arc<dyn Vm>,
    router: Arc<MsiRouter>,
}

impl MsiSender for IoapicMsi {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.vm
            .signal_msi(address, data)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn route_changed(&self, source: usize, msi: Option<devices::MsiMessage>) {
        let Ok(pin) = u32::try_from(source) else {
            return;
        };
        if let Err(e) = self
            .router
            .set_ioapic_pin_route(pin, msi.map(|m| (m.address, m.data)))
        {
            tracing::warn!("cannot route IOAPIC pin {pin}: {e}");
        }
    }
}

/// What the devices need from the VM being built.
pub struct DeviceSetup {
    /// The serial output, or `None` for no serial port.
    pub serial_out: Option<ConsoleWriter>,
    /// RAM below 4 GiB, for the CMOS memory fields.
    pub mem_below_4g: u64,
    /// RAM above 4 GiB.
    pub mem_above_4g: u64,
    /// CMOS NVRAM kept from before a guest reboot.
    pub cmos_state: Option<devices::cmos::CmosState>,
    /// Whether the debug-exit port exists.
    pub debug_exit: bool,
    /// vCPUs at boot and at most (for the CPU hotplug controller).
    pub cpus: (u32, u32),
    /// Signalled when the guest ejects a CPU or a PCI device.
    pub eject_event: EventFd,
    /// ACPI memory hotplug slots (0: no memory hotplug controller).
    pub memory_slots: u32,
}

/// The VM's devices and buses.
pub struct DeviceManager {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    ioapic: Arc<Mutex<Ioapic>>,
    serial: Option<Arc<Mutex<Serial>>>,
    cmos: Arc<Mutex<Cmos>>,
    pci: PciSegment,
    msi_router: Arc<MsiRouter>,
    /// INTA# of each PCI slot, on the IOAPIC pins the DSDT routes them to.
    pci_intx: PciIntx,
    ged: Arc<Mutex<Ged>>,
    cpu_hotplug: Arc<Mutex<CpuHotplugController>>,
    pci_hotplug: Arc<Mutex<PciHotplugController>>,
    memory_hotplug: Option<Arc<Mutex<devices::MemoryHotplugController>>>,
    virtio: Vec<(String, VirtioPciHandle)>,
    /// Devices the guest boots from (a `bootindex`): never hot-removed.
    boot_devices: std::collections::BTreeSet<String>,
    vm: Arc<dyn Vm>,
    /// The legacy PC devices (firmware boots only).
    legacy: Option<LegacyPc>,
    /// Wakes vCPU 0 for the legacy PIC.
    boot_vcpu_kicker: Arc<VcpuKicker>,
    /// Devices kept alive here; the buses hold weak references.
    _owned: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl DeviceManager {
    /// Creates the legacy and platform devices of the x86 platform.
    pub fn new(
        vm: &Arc<dyn Vm>,
        events: Arc<dyn PlatformEvents>,
        setup: DeviceSetup,
    ) -> Result<Self, DeviceError> {
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let place = |bus: &Bus, dev: Arc<Mutex<dyn BusDevice>>, base, len, name| {
            bus.insert(dev, base, len)
                .map_err(|source| DeviceError::Bus { name, source })
        };

        let msi_router = Arc::new(MsiRouter::new(vm.clone()));
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(IoapicMsi {
            vm: vm.clone(),
            router: msi_router.clone(),
        }))));
        place(
            &mmio_bus,
            ioapic.clone(),
            arch::layout::IOAPIC_START,
            IOAPIC_LEN,
            "IOAPIC",
        )?;

        let serial = match setup.serial_out {
            Some(out) => {
                let irq = Ioapic::pin(&ioapic, COM1_IRQ);
                let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(out))));
                place(&io_bus, serial.clone(), COM1_PORT, 8, "COM1")?;
                Some(serial)
            }
            None => None,
        };

        let mut cmos = Cmos::new(setup.mem_below_4g, setup.mem_above_4g);
        if let Some(state) = setup.cmos_state {
            cmos.set_state(&state);
        }
        let cmos = Arc::new(Mutex::new(cmos));
        place(&io_bus, cmos.clone(), CMOS_PORT, 2, "CMOS")?;

        let mut others: Vec<Arc<Mutex<dyn BusDevice>>> = Vec::new();
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
        // Two one-port ranges, leaving 0x61 (between them) to the PIT's port B.
        let i8042_ports = I8042::bus_devices(&i8042);
        let len = devices::i8042::I8042_PORT_LEN;
        place(
            &io_bus,
            i8042_ports.data.clone(),
            I8042_DATA_PORT,
            len,
            "i8042 data",
        )?;
        place(
            &io_bus,
            i8042_ports.command.clone(),
            I8042_COMMAND_PORT,
            len,
            "i8042 command",
        )?;
        others.push(i8042_ports.data);
        others.push(i8042_ports.command);

        let acpi = Arc::new(Mutex::new(AcpiPmDevice::new(events.clone())));
        place(
            &io_bus,
            acpi.clone(),
            u64::from(devices::acpi::ACPI_PM_PORT),
            1,
            "ACPI PM",
        )?;
        others.push(acpi);

        let port80 = Arc::new(Mutex::new(Port80::new()));
        place(&io_bus, port80.clone(), PORT80, 1, "port 0x80")?;
        others.push(port80);

        if setup.debug_exit {
            let dev = Arc::new(Mutex::new(DebugExit::new(events.clone())));
            place(&io_bus, dev.clone(), DEBUG_EXIT_PORT, 1, "debug-exit")?;
            others.push(dev);
        }

        // ACPI hotplug: the GED (its interrupt on IOAPIC pin 5) and the CPU and PCI hotplug controllers.
        let ged = Arc::new(Mutex::new(Ged::new(Ioapic::pin(&ioapic, GED_IRQ as usize))));
        place(&mmio_bus, ged.clone(), GED_MMIO_BASE, GED_MMIO_LEN, "GED")?;
        let mut cpu_hp = CpuHotplugController::new(setup.cpus.1, setup.cpus.0)
            .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
        let mut pci_hp = PciHotplugController::new();
        let notifier = || {
            setup
                .eject_event
                .try_clone()
                .map_err(|e| DeviceError::Hotplug(e.to_string()))
        };
        cpu_hp.set_eject_notifier(Some(notifier()?));
        pci_hp.set_eject_notifier(Some(notifier()?));
        let cpu_hotplug = Arc::new(Mutex::new(cpu_hp));
        place(
            &mmio_bus,
            cpu_hotplug.clone(),
            CPU_HOTPLUG_MMIO_BASE,
            CPU_HOTPLUG_MMIO_LEN,
            "CPU hotplug controller",
        )?;
        let pci_hotplug = Arc::new(Mutex::new(pci_hp));
        place(
            &mmio_bus,
            pci_hotplug.clone(),
            PCI_HOTPLUG_MMIO_BASE,
            PCI_HOTPLUG_MMIO_LEN,
            "PCI hotplug controller",
        )?;

        let memory_hotplug = if setup.memory_slots > 0 {
            let controller = devices::MemoryHotplugController::new(setup.memory_slots)
                .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
            let controller = Arc::new(Mutex::new(controller));
            place(
                &mmio_bus,
                controller.clone(),
                arch::layout::MEMORY_HOTPLUG_START,
                arch::layout::MEMORY_HOTPLUG_SIZE,
                "memory hotplug controller",
            )?;
            Some(controller)
        } else {
            None
        };

        // PCI segment 0: host bridge, configuration mechanism #1 and ECAM; devices come later.
        let pci = PciSegment::new(
            &io_bus,
            &mmio_bus,
            setup.mem_below_4g + setup.mem_above_4g,
            events.clone(),
        )?;

        Ok(DeviceManager {
            io_bus,
            mmio_bus,
            pci_intx: PciIntx::new(&ioapic),
            ioapic,
            serial,
            cmos,
            pci,
            msi_router,
            ged,
            cpu_hotplug,
            pci_hotplug,
            memory_hotplug,
            virtio: Vec::new(),
            boot_devices: Default::default(),
            vm: vm.clone(),
            legacy: None,
            boot_vcpu_kicker: Arc::new(VcpuKicker::default()),
            _owned: others,
        })
    }

    /// Adds the legacy PC devices firmware needs (PIC, PIT, ports 0x61 and 0x92); their interrupts reach vCPU 0.
    pub fn add_legacy_pc(&mut self, events: Arc<dyn PlatformEvents>) -> Result<(), DeviceError> {
        self.legacy = Some(LegacyPc::new(
            &self.io_bus,
            self.boot_vcpu_kicker.clone(),
            events,
        )?);
        Ok(())
    }

    /// Sets the boot sequence a BIOS reads from CMOS when it has no boot order list.
    pub fn set_boot_sequence(&self, devices: &[devices::cmos::CmosBootDevice]) {
        self.cmos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_boot_sequence(devices);
    }

    /// Adds the firmware debug console (port 0x402), writing to `out`.
    pub fn add_debug_console(
        &mut self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<(), DeviceError> {
        let console = Arc::new(Mutex::new(devices::debug_console::DebugConsole::new(out)));
        self.add_io_device(
            console,
            DEBUG_CONSOLE_PORT,
            devices::debug_console::DEBUG_CONSOLE_RANGE_LEN,
            "debug console",
        )
    }

    /// The legacy PIC as vCPU 0's external interrupt source, if the VM has one.
    pub fn extint(&self) -> Option<Arc<dyn crate::cpu::ExtIntSource>> {
        self.legacy.as_ref().map(LegacyPc::extint)
    }

    /// The legacy PC devices, if the VM has them.
    pub fn legacy(&self) -> Option<&LegacyPc> {
        self.legacy.as_ref()
    }

    /// Kicks vCPU 0 when the legacy PIC has an interrupt for it.
    pub fn boot_vcpu_kicker(&self) -> &Arc<VcpuKicker> {
        &self.boot_vcpu_kicker
    }

    /// The port I/O bus.
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The IOAPIC.
    pub fn ioapic(&self) -> &Arc<Mutex<Ioapic>> {
        &self.ioapic
    }

    /// COM1, if the VM has one.
    pub fn serial(&self) -> Option<&Arc<Mutex<Serial>>> {
        self.serial.as_ref()
    }

    /// Places a device the VM keeps for its whole life at `base` on the port I/O bus.
    pub fn add_io_device(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        name: &'static str,
    ) -> Result<(), DeviceError> {
        self.io_bus
            .insert(device.clone(), base, len)
            .map_err(|source| DeviceError::Bus { name, source })?;
        self._owned.push(device);
        Ok(())
    }

    /// The CMOS state (kept across a guest reboot).
    pub fn cmos_state(&self) -> devices::cmos::CmosState {
        self.cmos.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    /// Puts a virtio device on the PCI bus under `name` (before boot: the guest finds it when it scans).
    pub fn add_virtio(
        &mut self,
        name: String,
        mem: &virtio_devices::GuestMemory,
        device: Box<dyn virtio_devices::VirtioDevice>,
    ) -> Result<u8, DeviceError> {
        let slot = self.attach_virtio(name, mem, device)?;
        if let Err(e) = lock(&self.pci_hotplug).set_present(slot, true) {
            tracing::warn!("PCI hotplug controller: {e}");
        }
        Ok(slot)
    }

    fn attach_virtio(
        &mut self,
        name: String,
        mem: &virtio_devices::GuestMemory,
        device: Box<dyn virtio_devices::VirtioDevice>,
    ) -> Result<u8, DeviceError> {
        let handle = add_virtio_pci_device(
            &self.vm,
            &self.pci,
            &self.msi_router,
            &self.pci_intx,
            mem,
            device,
        )
        .map_err(|source| DeviceError::Virtio {
            name: name.clone(),
            source,
        })?;
        let slot = handle.slot;
        self.virtio.push((name, handle));
        Ok(slot)
    }

    /// Hot-adds a virtio device: puts it on the bus and tells the guest through the PCI hotplug controller and GED.
    pub fn hotplug_virtio(
        &mut self,
        name: String,
        mem: &virtio_devices::GuestMemory,
        device: Box<dyn virtio_devices::VirtioDevice>,
    ) -> Result<u8, DeviceError> {
        if self.virtio.iter().any(|(n, _)| *n == name) {
            return Err(DeviceError::Hotplug(format!(
                "a device called '{name}' exists already; choose another id="
            )));
        }
        let slot = self.attach_virtio(name.clone(), mem, device)?;
        let added = lock(&self.pci_hotplug).slot_added(slot);
        if let Err(e) = added {
            // Undo: the guest was never told about it.
            let _ = self.remove_virtio(&name);
            return Err(DeviceError::Hotplug(e.to_string()));
        }
        self.notify(GedEvent::PciHotplug);
        Ok(slot)
    }

    /// Marks `name` as a device the guest boots from, so it cannot be hot-removed.
    pub fn mark_boot_device(&mut self, name: &str) {
        self.boot_devices.insert(name.to_string());
    }

    /// Asks the guest to release the virtio device called `name`. Returns false if there is none.
    pub fn request_unplug(&mut self, name: &str) -> Result<bool, DeviceError> {
        if self.boot_devices.contains(name) {
            return Err(DeviceError::Hotplug(format!(
                "'{name}' is a boot device (it has a bootindex); it cannot be removed from a running VM"
            )));
        }
        let Some((_, handle)) = self.virtio.iter().find(|(n, _)| n == name) else {
            return Ok(false);
        };
        lock(&self.pci_hotplug)
            .request_eject(handle.slot)
            .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
        self.notify(GedEvent::PciHotplug);
        Ok(true)
    }

    /// Removes the PCI devices the guest has ejected; returns their names.
    pub fn collect_ejected_devices(&mut self) -> Vec<String> {
        let slots = lock(&self.pci_hotplug).take_ejected();
        let mut removed = Vec::new();
        for slot in slots {
            let Some(pos) = self.virtio.iter().position(|(_, h)| h.slot == slot) else {
                continue;
            };
            let (name, handle) = self.virtio.remove(pos);
            if let Err(e) = handle.remove(&self.pci) {
                tracing::warn!("removing {name}: {e}");
            }
            removed.push(name);
        }
        removed
    }

    /// Tells the guest CPU `id` was added.
    pub fn cpu_added(&self, id: u32) -> Result<(), DeviceError> {
        lock(&self.cpu_hotplug)
            .insert(id)
            .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
        self.notify(GedEvent::CpuHotplug);
        Ok(())
    }

    /// Asks the guest to release CPU `id`.
    pub fn cpu_removal_requested(&self, id: u32) -> Result<(), DeviceError> {
        lock(&self.cpu_hotplug)
            .request_removal(id)
            .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
        self.notify(GedEvent::CpuHotplug);
        Ok(())
    }

    /// CPUs the guest has ejected.
    pub fn take_ejected_cpus(&self) -> Vec<u32> {
        lock(&self.cpu_hotplug).take_ejected()
    }

    /// Tells the guest `len` bytes of memory at `base` were added in hotplug slot `slot`.
    pub fn memory_added(&self, slot: u32, base: u64, len: u64) -> Result<(), DeviceError> {
        let Some(controller) = &self.memory_hotplug else {
            return Err(DeviceError::Hotplug(
                "this VM has no memory hotplug; start it with --memory hotplug_size=".into(),
            ));
        };
        lock(controller)
            .insert(slot, base, len)
            .map_err(|e| DeviceError::Hotplug(e.to_string()))?;
        self.notify(GedEvent::MemoryHotplug);
        Ok(())
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) {
        self.notify(GedEvent::PowerButton);
    }

    fn notify(&self, event: GedEvent) {
        if let Err(e) = lock(&self.ged).notify(event) {
            tracing::warn!("GED: {e}");
        }
    }

    /// Removes the virtio device called `name`.
    pub fn remove_virtio(&mut self, name: &str) -> Result<bool, DeviceError> {
        let Some(pos) = self.virtio.iter().position(|(n, _)| n == name) else {
            return Ok(false);
        };
        let (_, handle) = self.virtio.remove(pos);
        handle.remove(&self.pci)?;
        Ok(true)
    }

    /// Tells the driver of the virtio device called `name` that its configuration changed (the generation moves on
    /// and the configuration interrupt fires). Returns false if there is no such device.
    pub fn virtio_config_changed(&self, name: &str) -> bool {
        let Some((_, handle)) = self.virtio.iter().find(|(n, _)| n == name) else {
            return false;
        };
        handle
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config_changed();
        true
    }

    /// The virtio devices: (name, PCI slot).
    pub fn virtio_devices(&self) -> impl Iterator<Item = (&str, u8)> {
        self.virtio.iter().map(|(name, h)| (name.as_str(), h.slot))
    }

    /// The counters of the virtio devices that keep some: (name, [(counter, value)]). Takes no device lock.
    pub fn virtio_counters(&self) -> impl Iterator<Item = (&str, Vec<(&'static str, u64)>)> {
        self.virtio
            .iter()
            .map(|(name, h)| (name.as_str(), h.counters()))
            .filter(|(_, counters)| !counters.is_empty())
    }
}
