//! Platform-wide events a device can raise.

/// Platform-wide events a device can raise; the VMM implements it (with eventfds) to stop or reset the VM.
///
/// The methods are called from vCPU threads while the calling device's lock is held, so an implementation must only
/// record the request and wake the VMM's control loop: it must not block or lock any device.
pub trait PlatformEvents: Send + Sync {
    /// The guest asked to power the machine off (ACPI S5).
    fn power_off(&self);
    /// The guest asked to reset the machine (i8042 reset line, ACPI reset register).
    fn reset(&self);
    /// The guest wrote `code` to the debug-exit port: the VMM ends with that status.
    fn debug_exit(&self, code: u8);
}
