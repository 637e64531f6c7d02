//! The debug-exit port (0xf4 when enabled): a test guest writes one byte `v` to end the VMM with status `v`.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::platform::PlatformEvents;

/// The device has no guest-visible state; this exists so every device can be saved the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugExitState {}

/// The debug-exit port.
pub struct DebugExit {
    events: Arc<dyn PlatformEvents>,
}

impl DebugExit {
    /// Creates the port; exit requests go to `events`.
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        DebugExit { events }
    }

    /// The (empty) state.
    pub fn state(&self) -> DebugExitState {
        DebugExitState {}
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [code]) => {
                tracing::info!("guest wrote {code:#04x} to the debug-exit port");
                self.events.debug_exit(*code);
            }
            _ => tracing::debug!(
                "debug-exit: ignoring a {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl PlatformEvents for Recorder {
        fn power_off(&self) {
            self.0.lock().unwrap().push("off".into());
        }
        fn reset(&self) {
            self.0.lock().unwrap().push("reset".into());
        }
        fn debug_exit(&self, code: u8) {
            self.0.lock().unwrap().push(format!("exit {code}"));
        }
    }

    #[test]
    fn byte_write_requests_exit_with_that_code() {
        let events = Arc::new(Recorder::default());
        let mut dev = DebugExit::new(events.clone());
        dev.write(0, &[0x31]);
        dev.write(0, &[0]);
        dev.write(0, &[1, 2]);
        dev.write(1, &[3]);
        let mut b = [0xffu8];
        dev.read(0, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(*events.0.lock().unwrap(), ["exit 49", "exit 0"]);
    }
}
