//! The vendor-specific capabilities that tell the driver where the virtio-pci structures live (virtio 1.2 §4.1.4).
//!
//! Each `virtio_pci_cap` is 16 bytes: ID (0x09), next pointer, `cap_len`, `cfg_type`, `bar`, `id`, two bytes of
//! padding, then the little-endian `offset` and `length` of the structure within the BAR. The notification
//! capability appends `notify_off_multiplier`; the PCI configuration access capability appends a 4-byte data window.

use pci::{PciCapability, PciCapabilityId};

/// Size of a `virtio_pci_cap` including the ID and next-pointer bytes.
const VIRTIO_PCI_CAP_LEN: u8 = 16;
/// Size of the notification and PCI configuration access capabilities.
const VIRTIO_PCI_CAP_LEN_EXTENDED: u8 = 20;

/// Offset of the `bar` byte within a capability (from its ID byte).
pub(crate) const CAP_BAR_OFFSET: usize = 4;
/// Offset of the `offset` field within a capability.
pub(crate) const CAP_OFFSET_OFFSET: usize = 8;
/// Offset of the `length` field within a capability.
pub(crate) const CAP_LENGTH_OFFSET: usize = 12;
/// Offset of `pci_cfg_data` within the PCI configuration access capability.
pub(crate) const CAP_PCI_CFG_DATA_OFFSET: usize = 16;

/// The structure a capability points at (`cfg_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VirtioPciCapType {
    /// Common configuration.
    Common = 1,
    /// Notifications.
    Notify = 2,
    /// ISR status.
    Isr = 3,
    /// Device-specific configuration.
    Device = 4,
    /// PCI configuration access window.
    PciCfg = 5,
}

/// A capability locating one virtio-pci structure in a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VirtioPciCap {
    cfg_type: VirtioPciCapType,
    bar: u8,
    offset: u32,
    length: u32,
    notify_off_multiplier: Option<u32>,
}

impl VirtioPciCap {
    /// A capability for the structure `cfg_type` at `offset..offset + length` of BAR `bar`.
    pub(crate) fn new(cfg_type: VirtioPciCapType, bar: u8, offset: u32, length: u32) -> Self {
        Self {
            cfg_type,
            bar,
            offset,
            length,
            notify_off_multiplier: None,
        }
    }

    /// The notification capability: queue `n`'s doorbell is at `offset + queue_notify_off(n) * multiplier`.
    pub(crate) fn notify(bar: u8, offset: u32, length: u32, multiplier: u32) -> Self {
        Self {
            notify_off_multiplier: Some(multiplier),
            ..Self::new(VirtioPciCapType::Notify, bar, offset, length)
        }
    }
}

/// The common body of every virtio-pci capability (after the ID and next bytes).
fn cap_body(cap_len: u8, cfg_type: VirtioPciCapType, bar: u8, offset: u32, length: u32) -> Vec<u8> {
    let mut body = vec![cap_len, cfg_type as u8, bar, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body
}

impl PciCapability for VirtioPciCap {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VENDOR_SPECIFIC
    }

    fn body(&self) -> Vec<u8> {
        let cap_len = if self.notify_off_multiplier.is_some() {
            VIRTIO_PCI_CAP_LEN_EXTENDED
        } else {
            VIRTIO_PCI_CAP_LEN
        };
        let mut body = cap_body(cap_len, self.cfg_type, self.bar, self.offset, self.length);
        if let Some(multiplier) = self.notify_off_multiplier {
            body.extend_from_slice(&multiplier.to_le_bytes());
        }
        body
    }
}

/// The PCI configuration access capability (`VIRTIO_PCI_CAP_PCI_CFG`): the driver writes `bar`, `offset` and
/// `length`, then reads or writes `pci_cfg_data` to access the BAR through configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PciCfgCap;

impl PciCapability for PciCfgCap {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VENDOR_SPECIFIC
    }

    fn body(&self) -> Vec<u8> {
        let mut body = cap_body(
            VIRTIO_PCI_CAP_LEN_EXTENDED,
            VirtioPciCapType::PciCfg,
            0,
            0,
            0,
        );
        body.extend_from_slice(&[0; 4]);
        body
    }

    fn writable_bits(&self) -> Vec<u8> {
        // Body offsets are capability offsets minus 2: `bar`, then `offset`, `length` and `pci_cfg_data`.
        let mut mask = vec![0u8; usize::from(VIRTIO_PCI_CAP_LEN_EXTENDED) - 2];
        mask[CAP_BAR_OFFSET - 2] = 0xff;
        for byte in &mut mask[CAP_OFFSET_OFFSET - 2..] {
            *byte = 0xff;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bodies_follow_the_spec_layout() {
        let cap = VirtioPciCap::new(VirtioPciCapType::Isr, 0, 0x1000, 1);
        assert_eq!(
            cap.body(),
            vec![16, 3, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 1, 0, 0, 0]
        );
        let notify = VirtioPciCap::notify(0, 0x3000, 8, 4);
        assert_eq!(notify.body().len(), 18);
        assert_eq!(notify.body()[0], 20);
        assert_eq!(notify.body()[14..], [4, 0, 0, 0]);
        assert_eq!(PciCfgCap.body().len(), 18);
        assert_eq!(PciCfgCap.body()[1], 5);
        let mask = PciCfgCap.writable_bits();
        assert_eq!(mask.len(), 18);
        assert_eq!(mask[..6], [0, 0, 0xff, 0, 0, 0]);
        assert!(mask[6..].iter().all(|byte| *byte == 0xff));
    }
}
