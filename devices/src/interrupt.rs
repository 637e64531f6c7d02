//! How devices signal interrupts: a wired line (an IOAPIC pin) or a message-signalled interrupt.

/// An interrupt input line (e.g. an IOAPIC pin) a device can pulse or hold.
pub trait InterruptLine: Send + Sync {
    /// Edge: sends one pulse (assert, then deassert).
    fn trigger(&self) -> std::io::Result<()>;
    /// Level-triggered devices: holds the line asserted (`true`) or releases it (`false`).
    fn set_level(&self, asserted: bool) -> std::io::Result<()>;
}

/// The address and data of a message-signalled interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// The message address (0xfee..... for the local APICs).
    pub address: u64,
    /// The message data.
    pub data: u32,
}

/// Sends a message-signalled interrupt (the VMM implements it with `KVM_SIGNAL_MSI`).
pub trait MsiSender: Send + Sync {
    /// Delivers the MSI with this address and data to the local APICs.
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()>;

    /// Told when the message an interrupt source (e.g. IOAPIC pin `source`) sends changes: `Some(message)` when it
    /// is unmasked, `None` when masked. A split-irqchip VMM mirrors these into the hypervisor's interrupt
    /// routing table, which is how the hypervisor learns which vectors need an IOAPIC EOI exit. The default
    /// ignores it.
    fn route_changed(&self, source: usize, msi: Option<MsiMessage>) {
        let _ = (source, msi);
    }
}
