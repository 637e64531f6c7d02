//! The firmware debug console (port 0x402 on a PC, QEMU's "debugcon"): every byte written goes to an output stream.
//!
//! Reads return 0xe9, the value firmware (SeaBIOS, OVMF) checks to decide the port exists. The output is flushed at
//! each newline, so a line shows up as soon as it is complete. Write errors are logged (the first one as a warning)
//! and the byte is dropped; the guest never sees them.

use std::io::Write;

use crate::bus::BusDevice;

/// Length of the port's range.
pub const DEBUG_CONSOLE_RANGE_LEN: u64 = 1;
/// What a read of the port returns.
pub const DEBUG_CONSOLE_READBACK: u8 = 0xe9;

/// The device has no guest-visible state; this exists so every device can be saved the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugConsoleState {}

/// The debug console port.
pub struct DebugConsole {
    out: Box<dyn Write + Send>,
    /// A write has failed before (later failures are logged at debug level only).
    failed: bool,
}

impl DebugConsole {
    /// Creates the port, writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        DebugConsole { out, failed: false }
    }

    /// The (empty) state.
    pub fn state(&self) -> DebugConsoleState {
        DebugConsoleState {}
    }

    fn emit(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(data)?;
        if data.contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(())
    }
}

impl BusDevice for DebugConsole {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUG_CONSOLE_READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Err(e) = self.emit(data) {
            if self.failed {
                tracing::debug!("debug console: cannot write the guest's output: {e}");
            } else {
                tracing::warn!("debug console: cannot write the guest's output: {e}; dropping it");
                self.failed = true;
            }
        }
    }
}

impl std::fmt::Debug for DebugConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugConsole").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what was written and what was flushed.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        flushed: Arc<Mutex<Vec<u8>>>,
        fail: bool,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.fail {
                return Err(std::io::Error::other("disk full"));
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let written = self.written.lock().unwrap().clone();
            *self.flushed.lock().unwrap() = written;
            Ok(())
        }
    }

    #[test]
    fn bytes_go_out_and_lines_are_flushed() {
        let sink = Sink::default();
        let mut con = DebugConsole::new(Box::new(sink.clone()));
        for &b in b"SeaBIOS" {
            con.write(0, &[b]);
        }
        assert_eq!(*sink.written.lock().unwrap(), b"SeaBIOS");
        assert!(sink.flushed.lock().unwrap().is_empty());
        con.write(0, b"\n");
        assert_eq!(*sink.flushed.lock().unwrap(), b"SeaBIOS\n");
        con.write(0, b"x");
        assert_eq!(*sink.flushed.lock().unwrap(), b"SeaBIOS\n");
        assert_eq!(*sink.written.lock().unwrap(), b"SeaBIOS\nx");
    }

    #[test]
    fn reads_identify_the_port() {
        let mut con = DebugConsole::new(Box::new(std::io::sink()));
        let mut b = [0u8];
        con.read(0, &mut b);
        assert_eq!(b, [0xe9]);
        let mut w = [0u8; 2];
        con.read(0, &mut w);
        assert_eq!(w, [0xe9, 0xe9]);
        assert_eq!(con.state(), DebugConsoleState {});
    }

    #[test]
    fn write_errors_are_swallowed() {
        let sink = Sink {
            fail: true,
            ..Sink::default()
        };
        let mut con = DebugConsole::new(Box::new(sink.clone()));
        con.write(0, b"a");
        con.write(0, b"\n");
        assert!(con.failed);
        assert!(sink.written.lock().unwrap().is_empty());
    }
}
