//! The hardware-reduced ACPI power-management register: sleep control, sleep status and reset in one byte.
//!
//! The FADT of a hardware-reduced platform points its sleep control register, sleep status register and reset
//! register all at this one I/O port ([`ACPI_PM_PORT`], a range of length 1). Writing SLP_EN with sleep type S5
//! powers the machine off, writing [`ACPI_RESET_VALUE`] resets it; other sleep types are not supported and are
//! ignored. Reads return 0: the sleep status register's WAK_STS is clear because the machine never sleeps.
//!
//! The constants here must stay equal to the ones the ACPI table generator writes into the FADT and DSDT (`_S5_`).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::platform::PlatformEvents;

/// The I/O port of the sleep control/status and reset registers.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Length of the range the device is inserted with.
pub const ACPI_PM_LEN: u64 = 1;
/// The SLP_TYP value of the S5 (soft-off) state, as the DSDT's `_S5_` package gives it.
pub const ACPI_SLEEP_TYPE_S5: u8 = 5;
/// The value written to the reset register (the FADT's RESET_VALUE).
pub const ACPI_RESET_VALUE: u8 = 1;

/// Sleep control register: SLP_EN, "enter the sleep state now".
const SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYP, bits 2..=4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The device has no guest-visible state; this exists so every device can be saved the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiPmState {}

/// The ACPI sleep control/status and reset register.
pub struct AcpiPmDevice {
    events: Arc<dyn PlatformEvents>,
}

impl AcpiPmDevice {
    /// Creates the register; power-off and reset requests go to `events`.
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        AcpiPmDevice { events }
    }

    /// The (empty) state.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {}
    }

    fn write_byte(&self, value: u8) {
        if value == ACPI_RESET_VALUE {
            tracing::info!("ACPI reset requested");
            self.events.reset();
            return;
        }
        if value & SLP_EN == 0 {
            tracing::debug!("ACPI PM: ignoring write {value:#04x} without SLP_EN");
            return;
        }
        match (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK {
            ACPI_SLEEP_TYPE_S5 => {
                tracing::info!("ACPI S5 requested, powering off");
                self.events.power_off();
            }
            other => {
                tracing::info!("ACPI PM: ignoring a request for unsupported sleep type {other}")
            }
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [value]) => self.write_byte(*value),
            _ => tracing::debug!(
                "ACPI PM: ignoring a {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for AcpiPmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPmDevice").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, PartialEq)]
    enum Event {
        PowerOff,
        Reset,
        DebugExit(u8),
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl PlatformEvents for Recorder {
        fn power_off(&self) {
            self.0.lock().unwrap().push(Event::PowerOff);
        }
        fn reset(&self) {
            self.0.lock().unwrap().push(Event::Reset);
        }
        fn debug_exit(&self, code: u8) {
            self.0.lock().unwrap().push(Event::DebugExit(code));
        }
    }

    fn after_writes(writes: &[(u64, &[u8])]) -> Vec<Event> {
        let events = Arc::new(Recorder::default());
        let mut dev = AcpiPmDevice::new(events.clone());
        for (offset, data) in writes {
            dev.write(*offset, data);
        }
        let recorded = std::mem::take(&mut *events.0.lock().unwrap());
        recorded
    }

    #[test]
    fn s5_powers_off() {
        // The documented value: SLP_EN | SLP_TYP=5.
        assert_eq!(SLP_EN | (ACPI_SLEEP_TYPE_S5 << SLP_TYP_SHIFT), 0x34);
        assert_eq!(after_writes(&[(0, &[0x34])]), [Event::PowerOff]);
        // Bits outside SLP_TYP/SLP_EN do not matter.
        assert_eq!(after_writes(&[(0, &[0x34 | 0x80])]), [Event::PowerOff]);
    }

    #[test]
    fn reset_value_resets() {
        assert_eq!(after_writes(&[(0, &[ACPI_RESET_VALUE])]), [Event::Reset]);
    }

    #[test]
    fn other_values_are_ignored() {
        let ignored: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (0, &[0x14]),            // S5 type without SLP_EN
            (0, &[0x20 | (3 << 2)]), // S3
            (0, &[0x20]),            // S0
            (0, &[0x34, 0x00]),      // not a byte write
            (1, &[0x34]),
        ];
        assert_eq!(after_writes(ignored), []);
    }

    #[test]
    fn reads_return_zero() {
        let mut dev = AcpiPmDevice::new(Arc::new(Recorder::default()));
        let mut data = [0xffu8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0, 0]);
        assert_eq!(dev.state(), AcpiPmState::default());
    }
}
