//! Why a VM stops: raised by devices (through `devices::PlatformEvents`) and vCPU threads, consumed by the control
//! loop through one eventfd.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// ACPI power-off.
    PowerOff,
    /// A guest-requested reset (i8042, ACPI reset register, or a triple fault when configured to reboot).
    Reset,
    /// A value written to the debug-exit port.
    DebugExit(u8),
    /// A triple fault on `vcpu`.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
        /// Its registers, formatted.
        registers: String,
    },
    /// KVM could not run the guest (internal error, emulation failure, failed entry).
    GuestCrash {
        /// The vCPU that crashed.
        vcpu: u32,
        /// One line of reason.
        reason: String,
        /// Its registers, formatted.
        registers: String,
    },
    /// A vCPU thread hit a VMM-side error.
    VcpuError(String),
}

/// The first stop reason raised, and an eventfd the control loop polls.
pub struct VmEvents {
    evt: EventFd,
    reason: Mutex<Option<StopReason>>,
}

impl VmEvents {
    /// Creates the event channel.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmEvents {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless one is already recorded (the first one wins), and wakes the control loop.
    pub fn raise(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal the control loop: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes the recorded reason, clearing it (for the next boot).
    pub fn take_reason(&self) -> Option<StopReason> {
        let _ = self.evt.read();
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The eventfd to poll.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl devices::PlatformEvents for VmEvents {
    fn power_off(&self) {
        self.raise(StopReason::PowerOff);
    }

    fn reset(&self) {
        self.raise(StopReason::Reset);
    }

    fn debug_exit(&self, code: u8) {
        self.raise(StopReason::DebugExit(code));
    }
}
