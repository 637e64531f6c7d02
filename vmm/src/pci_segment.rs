//! PCI segment 0 as the VMM sees it: the bus, its two configuration access mechanisms on the port and MMIO buses,
//! the BAR address windows, and the relocation of BARs when the guest moves them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::{Bus, BusDevice};
use pci::{
    AddressAllocator, BarMover, PciBarBusDevice, PciBarRegionType, PciBus, PciConfigIo,
    PciConfigMmio, PciDeviceHandle, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};

/// Errors managing PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciSegmentError {
    /// The PCI bus refused the device (no free slot, or the slot is taken).
    #[error("cannot add the PCI device: {0}")]
    Bus(#[source] pci::PciBusError),
    /// A BAR window is full.
    #[error("no room for a {size:#x}-byte BAR in the PCI {window} window; remove a device or use fewer queues")]
    WindowFull {
        /// "32-bit MMIO", "64-bit MMIO" or "I/O".
        window: &'static str,
        /// The BAR size.
        size: u64,
    },
    /// Placing a BAR or the config mechanisms on a bus failed.
    #[error("cannot map PCI region at {base:#x}: {source}")]
    Map {
        /// The region base.
        base: u64,
        /// The bus error.
        #[source]
        source: devices::BusError,
    },
    /// An allocator could not be created.
    #[error("invalid PCI window: {0}")]
    Window(String),
}

/// Called when the guest moves a BAR: (old base, new base).
pub type BarMoveHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// One mapped BAR.
struct MappedBar {
    device: Arc<Mutex<dyn BusDevice>>,
    len: u64,
    io: bool,
    hook: Option<BarMoveHook>,
}

/// Keeps each BAR's bus device where the guest has put the BAR.
pub struct BarRelocator {
    mmio_bus: Arc<Bus>,
    io_bus: Arc<Bus>,
    /// Keyed by (is I/O, base).
    bars: Mutex<BTreeMap<(bool, u64), MappedBar>>,
}

impl BarRelocator {
    fn bars(&self) -> MutexGuard<'_, BTreeMap<(bool, u64), MappedBar>> {
        self.bars.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bus(&self, io: bool) -> &Bus {
        if io {
            &self.io_bus
        } else {
            &self.mmio_bus
        }
    }

    fn map(&self, base: u64, bar: MappedBar) -> Result<(), PciSegmentError> {
        self.bus(bar.io)
            .insert(bar.device.clone(), base, bar.len)
            .map_err(|source| PciSegmentError::Map { base, source })?;
        self.bars().insert((bar.io, base), bar);
        Ok(())
    }

    fn unmap(&self, io: bool, base: u64) -> Option<MappedBar> {
        let bar = self.bars().remove(&(io, base))?;
        let _ = self.bus(io).remove(base, bar.len);
        Some(bar)
    }
}

impl BarMover for BarRelocator {
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        len: u64,
        region: PciBarRegionType,
    ) -> Result<(), String> {
        let io = !region.is_memory();
        let Some(bar) = self.unmap(io, old_base) else {
            return Err(format!("no BAR mapped at {old_base:#x}"));
        };
        if bar.len != len {
            tracing::warn!(
                "BAR at {old_base:#x} moved with length {len:#x}, mapped {:#x}",
                bar.len
            );
        }
        let hook = bar.hook.clone();
        let restore = MappedBar {
            device: bar.device.clone(),
            len: bar.len,
            io,
            hook: bar.hook.clone(),
        };
        if let Err(e) = self.map(new_base, bar) {
            // Put it back where it was so the device stays reachable; the guest's next write retries.
            let _ = self.map(old_base, restore);
            return Err(e.to_string());
        }
        if let Some(hook) = hook {
            hook(old_base, new_base);
        }
        Ok(())
    }
}

/// PCI segment 0.
pub struct PciSegment {
    bus: Arc<Mutex<PciBus>>,
    relocator: Arc<BarRelocator>,
    mmio32: Mutex<AddressAllocator>,
    mmio64: Mutex<AddressAllocator>,
    /// Kept alive here: the buses hold weak references.
    _config_io: Arc<Mutex<PciConfigIo>>,
    _config_mmio: Arc<Mutex<PciConfigMmio>>,
}

impl PciSegment {
    /// Creates the bus with its host bridge and places mechanism #1 (ports 0xcf8..) and ECAM on the buses.
    pub fn new(
        io_bus: &Arc<Bus>,
        mmio_bus: &Arc<Bus>,
        ram_size: u64,
        events: Arc<dyn devices::PlatformEvents>,
    ) -> Result<Self, PciSegmentError> {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let relocator = Arc::new(BarRelocator {
            mmio_bus: mmio_bus.clone(),
            io_bus: io_bus.clone(),
            bars: Mutex::new(BTreeMap::new()),
        });
        let config_io = Arc::new(Mutex::new(
            PciConfigIo::new(bus.clone(), relocator.clone()).with_reset_control(events),
        ));
        io_bus
            .insert(
                config_io.clone(),
                PCI_CONFIG_IO_PORT,
                PCI_CONFIG_IO_PORT_SIZE,
            )
            .map_err(|source| PciSegmentError::Map {
                base: PCI_CONFIG_IO_PORT,
                source,
            })?;
        let last_bus = ((arch::layout::PCI_MMCONFIG_SIZE / pci::ECAM_BUS_SIZE) - 1) as u8;
        let config_mmio = Arc::new(Mutex::new(PciConfigMmio::new(
            bus.clone(),
            relocator.clone(),
            last_bus,
        )));
        mmio_bus
            .insert(
                config_mmio.clone(),
                arch::layout::PCI_MMCONFIG_START,
                arch::layout::PCI_MMCONFIG_SIZE,
            )
            .map_err(|source| PciSegmentError::Map {
                base: arch::layout::PCI_MMCONFIG_START,
                source,
            })?;
        let window = |base, size| {
            AddressAllocator::new(base, size).map_err(|e| PciSegmentError::Window(e.to_string()))
        };
        let (mmio64_base, mmio64_size) = arch::layout::pci_mmio64_window(ram_size);
        Ok(PciSegment {
            bus,
            relocator,
            mmio32: Mutex::new(window(
                arch::layout::PCI_MMIO32_START,
                arch::layout::PCI_MMIO32_SIZE,
            )?),
            mmio64: Mutex::new(window(mmio64_base, mmio64_size)?),
            _config_io: config_io,
            _config_mmio: config_mmio,
        })
    }

    /// Allocates guest-physical space for a memory BAR of `size` bytes (a power of two), naturally aligned.
    pub fn allocate_bar(&self, size: u64, is_64bit: bool) -> Result<u64, PciSegmentError> {
        let (alloc, window) = if is_64bit {
            (&self.mmio64, "64-bit MMIO")
        } else {
            (&self.mmio32, "32-bit MMIO")
        };
        alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocate(size, size.max(4096))
            .ok_or(PciSegmentError::WindowFull { window, size })
    }

    /// Puts `device` in `slot` (or the first free slot) and maps its BARs where its configuration says they are.
    /// `hook` is told when the guest moves a BAR (e.g. to move ioeventfds along).
    pub fn add_device(
        &self,
        slot: Option<u8>,
        device: PciDeviceHandle,
        hook: Option<BarMoveHook>,
    ) -> Result<u8, PciSegmentError> {
        let regions = device.lock().unwrap_or_else(|p| p.into_inner()).bars();
        let slot = self
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_device(slot, device.clone())
            .map_err(PciSegmentError::Bus)?;
        let mut mapped = Vec::new();
        for region in regions {
            let io = !region.region_type.is_memory();
            let bar = MappedBar {
                device: Arc::new(Mutex::new(PciBarBusDevice::new(
                    device.clone(),
                    region.index,
                ))),
                len: region.len,
                io,
                hook: hook.clone(),
            };
            if let Err(e) = self.relocator.map(region.base, bar) {
                for (io, base) in mapped {
                    self.relocator.unmap(io, base);
                }
                let _ = self
                    .bus
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove_device(slot);
                return Err(e);
            }
            mapped.push((io, region.base));
        }
        Ok(slot)
    }

    /// Takes the device in `slot` off the bus and unmaps its BARs, freeing their address space.
    pub fn remove_device(&self, slot: u8) -> Result<PciDeviceHandle, PciSegmentError> {
        let device = self
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_device(slot)
            .map_err(PciSegmentError::Bus)?;
        let regions = device.lock().unwrap_or_else(|p| p.into_inner()).bars();
        for region in regions {
            let io = !region.region_type.is_memory();
            self.relocator.unmap(io, region.base);
            let alloc = if region.region_type.is_64bit() {
                &self.mmio64
            } else {
                &self.mmio32
            };
            let _ = alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free(region.base);
        }
        Ok(device)
    }

    /// The slots in use (slot 0 is the host bridge).
    pub fn occupied_slots(&self) -> Vec<u8> {
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .occupied_slots()
    }
}
