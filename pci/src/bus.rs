//! PCI bus 0: 32 device slots with a host bridge in slot 0, and the function addressing both access mechanisms use.
//!
//! Only function 0 of each slot is populated for now; [`PciAddress`] already carries the function number so
//! multi-function devices can be added without changing the access paths. Any access to an absent bus, slot or
//! function reads all-ones (vendor ID 0xffff), which is how guests detect an empty slot.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::configuration::{PciClassCode, PciConfiguration, PciHeader};
use crate::device::{PciDevice, PciDeviceHandle};

/// Device slots on a bus.
pub const NUM_DEVICE_SLOTS: u8 = 32;
/// Functions per device.
pub const NUM_FUNCTIONS: u8 = 8;
/// The slot of the host bridge.
pub const HOST_BRIDGE_SLOT: u8 = 0;
/// Vendor ID of the host bridge: Intel, as Cloud Hypervisor's host bridge uses.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge. No guest driver binds to 8086:0d57, so the bridge stays inert; guests only need
/// a class 06/00 function at 00.0 to find the root bus.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

/// Errors adding devices to or removing them from the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciBusError {
    /// Slot number 32 or above.
    #[error("PCI slot {0} does not exist; use slots 1 to 31")]
    SlotOutOfRange(u8),
    /// The slot holds a device already.
    #[error("PCI slot {0} is already occupied; choose a free slot or let the bus pick one")]
    SlotOccupied(u8),
    /// All 31 device slots are taken.
    #[error("all PCI slots on bus 0 are occupied; remove a device first")]
    NoFreeSlot,
    /// Nothing to remove.
    #[error("PCI slot {0} is empty; there is no device to remove")]
    SlotEmpty(u8),
    /// The host bridge is part of the bus.
    #[error("the host bridge in PCI slot 0 cannot be removed")]
    HostBridgeRemoval,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, PciBusError>;

/// A bus/device/function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, below 32.
    pub device: u8,
    /// Function number, below 8.
    pub function: u8,
}

impl PciAddress {
    /// An address, or `None` if the device or function number is out of range.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < NUM_DEVICE_SLOTS && function < NUM_FUNCTIONS).then_some(Self {
            bus,
            device,
            function,
        })
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The host bridge at 00.0: a bare type-0 header with class 06/00, no BARs, no capabilities.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

/// Subsystem vendor of the host bridge (Red Hat, Inc., as on QEMU).
pub const HOST_BRIDGE_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem ID of the host bridge ("QEMU virtual machine").
pub const HOST_BRIDGE_SUBSYSTEM_ID: u16 = 0x1100;

impl PciHostBridge {
    /// A host bridge with Atrium's IDs.
    pub fn new() -> Self {
        let header = PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision_id: 0,
            class_code: PciClassCode::HOST_BRIDGE,
            // The subsystem IDs QEMU gives its host bridges: firmware built for QEMU (SeaBIOS) looks for them before
            // it uses fw_cfg and its virtual-platform setup.
            subsystem_vendor_id: HOST_BRIDGE_SUBSYSTEM_VENDOR_ID,
            subsystem_id: HOST_BRIDGE_SUBSYSTEM_ID,
            multi_function: false,
            interrupt_pin: None,
        };
        // The header is a constant with a valid vendor ID, so it needs no validation.
        Self {
            config: PciConfiguration::from_valid_header(&header),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Bus 0 of PCI segment 0.
pub struct PciBus {
    slots: Vec<Option<PciDeviceHandle>>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("occupied_slots", &self.occupied_slots())
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// An empty bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<PciDeviceHandle>> = vec![None; usize::from(NUM_DEVICE_SLOTS)];
        slots[usize::from(HOST_BRIDGE_SLOT)] = Some(Arc::new(Mutex::new(PciHostBridge::new())));
        Self { slots }
    }

    /// Places `device` in `slot`, or in the lowest free slot when `slot` is `None`, and returns the slot used.
    pub fn add_device(&mut self, slot: Option<u8>, device: PciDeviceHandle) -> Result<u8> {
        let slot = match slot {
            Some(slot) => {
                let entry = self
                    .slots
                    .get(usize::from(slot))
                    .ok_or(PciBusError::SlotOutOfRange(slot))?;
                if entry.is_some() {
                    return Err(PciBusError::SlotOccupied(slot));
                }
                slot
            }
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciBusError::NoFreeSlot)? as u8,
        };
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// Takes the device out of `slot` (hot-unplug) and hands it back.
    pub fn remove_device(&mut self, slot: u8) -> Result<PciDeviceHandle> {
        if slot == HOST_BRIDGE_SLOT {
            return Err(PciBusError::HostBridgeRemoval);
        }
        self.slots
            .get_mut(usize::from(slot))
            .ok_or(PciBusError::SlotOutOfRange(slot))?
            .take()
            .ok_or(PciBusError::SlotEmpty(slot))
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<PciDeviceHandle> {
        self.slots.get(usize::from(slot)).cloned().flatten()
    }

    /// The function at `address`, if present: bus 0, an occupied slot, function 0.
    pub fn function(&self, address: PciAddress) -> Option<PciDeviceHandle> {
        if address.bus != 0 || address.function != 0 {
            return None;
        }
        self.device(address.device)
    }

    /// The occupied slots, in order.
    pub fn occupied_slots(&self) -> Vec<u8> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, device)| device.as_ref().map(|_| slot as u8))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{BAR0_REG, CLASS_REG, VENDOR_DEVICE_REG};
    use crate::device::lock_device;

    fn endpoint(device_id: u16) -> PciDeviceHandle {
        Arc::new(Mutex::new(PciHostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id,
                revision_id: 0,
                class_code: PciClassCode::OTHER,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                multi_function: false,
                interrupt_pin: None,
            })
            .unwrap(),
        }))
    }

    fn device_id(device: &PciDeviceHandle) -> u16 {
        lock_device(device).config().device_id()
    }

    #[test]
    fn host_bridge_at_slot_zero() {
        let bus = PciBus::new();
        assert_eq!(bus.occupied_slots(), vec![0]);
        let bridge = bus.function(PciAddress::new(0, 0, 0).unwrap()).unwrap();
        let mut bridge = lock_device(&bridge);
        assert_eq!(bridge.read_config_register(VENDOR_DEVICE_REG), 0x0d57_8086);
        assert_eq!(bridge.read_config_register(CLASS_REG), 0x0600_0000);
        assert!(bridge.bars().is_empty());
        let mut data = [0; 4];
        bridge.read_bar(0, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        bridge.write_bar(0, 0, &data);
        // The host bridge has no BARs to probe.
        bridge.write_config_register(BAR0_REG, 0, &[0xff; 4]);
        assert_eq!(bridge.read_config_register(BAR0_REG), 0);
    }

    #[test]
    fn add_picks_first_free_slot() {
        let mut bus = PciBus::new();
        assert_eq!(bus.add_device(None, endpoint(1)), Ok(1));
        assert_eq!(bus.add_device(Some(5), endpoint(5)), Ok(5));
        assert_eq!(bus.add_device(None, endpoint(2)), Ok(2));
        assert_eq!(
            bus.add_device(Some(5), endpoint(6)),
            Err(PciBusError::SlotOccupied(5))
        );
        assert_eq!(
            bus.add_device(Some(0), endpoint(6)),
            Err(PciBusError::SlotOccupied(0))
        );
        assert_eq!(
            bus.add_device(Some(32), endpoint(6)),
            Err(PciBusError::SlotOutOfRange(32))
        );
        assert_eq!(
            bus.add_device(Some(255), endpoint(6)),
            Err(PciBusError::SlotOutOfRange(255))
        );
        assert_eq!(bus.occupied_slots(), vec![0, 1, 2, 5]);
        assert_eq!(device_id(&bus.device(5).unwrap()), 5);
    }

    #[test]
    fn bus_fills_up_and_slots_are_reused() {
        let mut bus = PciBus::new();
        for slot in 1..32 {
            assert_eq!(bus.add_device(None, endpoint(u16::from(slot))), Ok(slot));
        }
        assert_eq!(
            bus.add_device(None, endpoint(99)),
            Err(PciBusError::NoFreeSlot)
        );
        let removed = bus.remove_device(7).unwrap();
        assert_eq!(device_id(&removed), 7);
        assert!(bus.device(7).is_none());
        assert_eq!(bus.add_device(None, endpoint(77)), Ok(7));
        assert_eq!(device_id(&bus.device(7).unwrap()), 77);
    }

    #[test]
    fn remove_errors() {
        let mut bus = PciBus::new();
        assert_eq!(
            bus.remove_device(0).err(),
            Some(PciBusError::HostBridgeRemoval)
        );
        assert_eq!(bus.remove_device(3).err(), Some(PciBusError::SlotEmpty(3)));
        assert_eq!(
            bus.remove_device(32).err(),
            Some(PciBusError::SlotOutOfRange(32))
        );
        assert_eq!(bus.occupied_slots(), vec![0]);
    }

    #[test]
    fn only_function_zero_on_bus_zero_is_present() {
        let mut bus = PciBus::new();
        bus.add_device(Some(3), endpoint(3)).unwrap();
        assert!(bus.function(PciAddress::new(0, 3, 0).unwrap()).is_some());
        assert!(bus.function(PciAddress::new(0, 3, 1).unwrap()).is_none());
        assert!(bus.function(PciAddress::new(1, 3, 0).unwrap()).is_none());
        assert!(bus.function(PciAddress::new(0, 4, 0).unwrap()).is_none());
        assert!(bus.device(200).is_none());
    }

    #[test]
    fn address_validation_and_display() {
        assert!(PciAddress::new(0, 32, 0).is_none());
        assert!(PciAddress::new(0, 0, 8).is_none());
        assert_eq!(PciAddress::new(0, 0x1f, 7).unwrap().to_string(), "00:1f.7");
    }
}
