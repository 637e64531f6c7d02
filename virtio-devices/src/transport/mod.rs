//! The modern virtio-pci transport.

mod capabilities;
mod common_config;
mod interrupt;
mod pci_device;

pub use interrupt::VIRTIO_MSI_NO_VECTOR;
pub use pci_device::{
    notify_address, VirtioPciDevice, VirtioPciDeviceState, VirtioPciError, COMMON_CONFIG_OFFSET,
    DEVICE_CONFIG_OFFSET, ISR_OFFSET, MAX_QUEUES, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_PCI_BAR_SIZE, VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_VENDOR_ID,
};
