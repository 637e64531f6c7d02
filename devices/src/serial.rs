//! A 16550A UART (COM1 on a PC), built on `vm_superio::Serial`, which implements the registers.
//!
//! Eight ports, offsets 0..8 from the base. A wider access is split into byte accesses at consecutive offsets, as on
//! the ISA bus. Interrupts go out as pulses on an [`InterruptLine`] (an edge-triggered IOAPIC pin on a PC).

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// The UART registers and receive FIFO, without the output and interrupt handles.
pub use vm_superio::serial::SerialState;

/// Ports the UART decodes.
pub const SERIAL_PORT_COUNT: u64 = 8;

/// Errors feeding input to the UART or restoring it.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The receive FIFO had no room for part of the input; the first `accepted` bytes were queued.
    #[error(
        "serial receive FIFO full: queued {accepted} of {len} input bytes; retry the rest once the guest reads some"
    )]
    FifoFull {
        /// Bytes queued (a prefix of the input).
        accepted: usize,
        /// Bytes offered.
        len: usize,
    },
    /// The guest put the UART in loopback mode, which disconnects the external input.
    #[error("serial input dropped: the guest has the UART in loopback mode")]
    Loopback,
    /// Input was queued but the interrupt line could not be raised.
    #[error("serial input queued but the interrupt could not be raised: {0}")]
    Interrupt(#[source] std::io::Error),
    /// A saved state's receive FIFO holds more bytes than the UART's.
    #[error(
        "saved serial state holds {0} receive bytes, more than the FIFO size; the state is corrupt"
    )]
    StateFifoTooLarge(usize),
}

/// Adapts an [`InterruptLine`] to `vm_superio`'s `Trigger`.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>;

/// Modem control register loopback bit.
const MCR_LOOP: u8 = 0x10;

/// A 16550A UART on the I/O bus.
pub struct Serial {
    uart: Uart,
    /// Whether the last output write failed, to log a broken output once rather than per byte.
    output_failing: bool,
}

impl Serial {
    /// Creates a UART in its reset state that raises interrupts on `irq` and writes guest output to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(LineTrigger(irq), out),
            output_failing: false,
        }
    }

    /// Rebuilds a UART from saved state; raises the interrupts the state has pending and enabled.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        let uart = vm_superio::Serial::from_state(state, LineTrigger(irq), NoEvents, out).map_err(
            |e| match e {
                UartError::Trigger(e) | UartError::IOError(e) => SerialError::Interrupt(e),
                UartError::FullFifo => SerialError::StateFifoTooLarge(state.in_buffer.len()),
            },
        )?;
        Ok(Serial {
            uart,
            output_failing: false,
        })
    }

    /// The current register and FIFO state.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Replaces where guest output goes (e.g. when a console client connects).
    pub fn set_output(&mut self, out: Box<dyn Write + Send>) {
        *self.uart.writer_mut() = out;
        self.output_failing = false;
    }

    /// Room left in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest to read and raises the receive interrupt if the guest enabled it.
    ///
    /// Queues as much as fits; if not everything did, returns [`SerialError::FifoFull`] saying how much was taken,
    /// so the caller can offer the rest again after the guest drains the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<(), SerialError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.uart.state().modem_control & MCR_LOOP != 0 {
            return Err(SerialError::Loopback);
        }
        let accepted = match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            Err(UartError::Trigger(e) | UartError::IOError(e)) => {
                return Err(SerialError::Interrupt(e))
            }
        };
        if accepted < bytes.len() {
            return Err(SerialError::FifoFull {
                accepted,
                len: bytes.len(),
            });
        }
        Ok(())
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        match self.uart.write(offset, value) {
            Ok(()) => {
                if self.output_failing && offset == 0 {
                    tracing::info!("serial output works again");
                    self.output_failing = false;
                }
            }
            Err(UartError::IOError(e)) => {
                // The guest cannot be blocked; the byte is lost.
                if !self.output_failing {
                    tracing::warn!(
                        "serial output failed, dropping guest output until it recovers: {e}"
                    );
                    self.output_failing = true;
                }
            }
            Err(UartError::Trigger(e)) => {
                tracing::warn!("serial interrupt could not be raised: {e}")
            }
            Err(UartError::FullFifo) => {
                tracing::debug!("serial loopback byte dropped: receive FIFO full")
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match register(offset, i) {
                Some(reg) => self.uart.read(reg),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if let Some(reg) = register(offset, i) {
                self.write_byte(reg, byte);
            }
        }
    }
}

/// The register at byte `i` of an access at `offset`, if the UART decodes it.
fn register(offset: u64, i: usize) -> Option<u8> {
    let at = offset.checked_add(u64::try_from(i).ok()?)?;
    if at < SERIAL_PORT_COUNT {
        u8::try_from(at).ok()
    } else {
        None
    }
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Counts pulses.
    #[derive(Default)]
    struct Line {
        pulses: AtomicUsize,
    }

    impl InterruptLine for Line {
        fn trigger(&self) -> std::io::Result<()> {
            self.pulses.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, _asserted: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer the test can look into.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that always fails.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    fn uart() -> (Serial, Arc<Line>, Sink) {
        let line = Arc::new(Line::default());
        let sink = Sink::default();
        (
            Serial::new(line.clone(), Box::new(sink.clone())),
            line,
            sink,
        )
    }

    fn inb(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let (mut s, line, sink) = uart();
        for &b in b"hello\n" {
            s.write(0, &[b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
        // THR-empty interrupts are off by default.
        assert_eq!(line.pulses.load(Ordering::SeqCst), 0);
        // Transmitter empty and holding register empty.
        assert_eq!(inb(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn thr_empty_interrupt_when_enabled() {
        let (mut s, line, _sink) = uart();
        s.write(IER, &[0x02]);
        let after_enable = line.pulses.load(Ordering::SeqCst);
        assert_eq!(
            after_enable, 1,
            "enabling THRE with an empty THR raises it at once"
        );
        // IIR says THR empty (0x2), with the 16550A FIFO bits.
        assert_eq!(inb(&mut s, IIR), 0xc2);
        s.write(0, b"x");
        assert_eq!(line.pulses.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn input_is_readable_from_rbr_and_raises_rda() {
        let (mut s, line, _sink) = uart();
        s.write(IER, &[0x01]);
        s.enqueue_input(b"ok").unwrap();
        assert_eq!(line.pulses.load(Ordering::SeqCst), 1);
        assert_eq!(inb(&mut s, LSR) & 0x01, 0x01, "data ready");
        assert_eq!(inb(&mut s, 0), b'o');
        assert_eq!(inb(&mut s, 0), b'k');
        assert_eq!(inb(&mut s, LSR) & 0x01, 0);
        assert_eq!(s.fifo_capacity(), 64);
    }

    #[test]
    fn full_fifo_is_a_retryable_error() {
        let (mut s, _line, _sink) = uart();
        let room = s.fifo_capacity();
        let input = vec![b'a'; room + 10];
        match s.enqueue_input(&input) {
            Err(SerialError::FifoFull { accepted, len }) => {
                assert_eq!((accepted, len), (room, room + 10))
            }
            other => panic!("expected FifoFull, got {other:?}"),
        }
        assert_eq!(s.fifo_capacity(), 0);
        assert!(matches!(
            s.enqueue_input(b"b"),
            Err(SerialError::FifoFull {
                accepted: 0,
                len: 1
            })
        ));
        inb(&mut s, 0);
        s.enqueue_input(b"b").unwrap();
        s.enqueue_input(b"").unwrap();
    }

    #[test]
    fn loopback_disconnects_input() {
        let (mut s, _line, sink) = uart();
        s.write(4, &[0x10]);
        assert!(matches!(s.enqueue_input(b"z"), Err(SerialError::Loopback)));
        s.write(0, b"q");
        assert_eq!(inb(&mut s, 0), b'q');
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn output_can_be_swapped_and_failures_do_not_panic() {
        let (mut s, _line, first) = uart();
        s.write(0, b"1");
        s.set_output(Box::new(Broken));
        s.write(0, b"2");
        s.write(0, b"3");
        let second = Sink::default();
        s.set_output(Box::new(second.clone()));
        s.write(0, b"4");
        assert_eq!(first.0.lock().unwrap().as_slice(), b"1");
        assert_eq!(second.0.lock().unwrap().as_slice(), b"4");
    }

    #[test]
    fn wide_access_is_split_and_out_of_range_bytes_ignored() {
        let (mut s, _line, _sink) = uart();
        // Scratch register is offset 7; the byte after it is outside the UART.
        s.write(7, &[0x5a, 0x11]);
        let mut b = [0u8; 2];
        s.read(7, &mut b);
        assert_eq!(b, [0x5a, 0xff]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trip() {
        let (mut s, _line, _sink) = uart();
        s.write(7, &[0x33]);
        s.write(IER, &[0x01]);
        s.enqueue_input(b"abc").unwrap();
        let state = s.state();
        let line = Arc::new(Line::default());
        let restored = Serial::from_state(&state, line.clone(), Box::new(Sink::default())).unwrap();
        assert_eq!(restored.state(), state);
        // The pending receive interrupt is raised again.
        assert_eq!(line.pulses.load(Ordering::SeqCst), 1);

        let bad = SerialState {
            in_buffer: vec![0; 65],
            ..state
        };
        assert!(matches!(
            Serial::from_state(&bad, line, Box::new(Sink::default())),
            Err(SerialError::StateFifoTooLarge(65))
        ));
    }
}
