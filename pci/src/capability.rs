//! PCI capabilities as a device describes them before they are linked into the configuration space.

use serde::{Deserialize, Serialize};

/// A capability ID (the first byte of a capability structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PciCapabilityId(pub u8);

impl PciCapabilityId {
    /// PCI power management.
    pub const POWER_MANAGEMENT: Self = Self(0x01);
    /// Message signalled interrupts.
    pub const MSI: Self = Self(0x05);
    /// Vendor-specific (virtio-pci uses it for its structure locations).
    pub const VENDOR_SPECIFIC: Self = Self(0x09);
    /// PCI Express.
    pub const PCI_EXPRESS: Self = Self(0x10);
    /// MSI-X.
    pub const MSIX: Self = Self(0x11);
}

/// A capability structure to link into a device's configuration space.
///
/// The first two bytes of every capability (ID and next pointer) belong to the configuration space, which fills
/// them in; `body` is everything after them.
pub trait PciCapability {
    /// The capability ID.
    fn id(&self) -> PciCapabilityId;

    /// The capability's bytes following the ID and next-pointer bytes.
    fn body(&self) -> Vec<u8>;

    /// For each byte of `body`, the bits the guest may change. Missing bytes are read-only; by default the whole
    /// capability is read-only.
    fn writable_bits(&self) -> Vec<u8> {
        Vec::new()
    }
}
