//! The i8042 keyboard controller with a PS/2 keyboard that answers commands, reduced to what firmware and an OS
//! probe, and the reset line.
//!
//! Two ways to put it on a bus: as two one-port ranges from [`I8042::bus_devices`] (the data port at 0x60 and the
//! status/command port at 0x64 on a PC), which leaves 0x61 (system control port B) to the PIT; or the controller
//! itself as one range of five ports ([`I8042_RANGE_LEN`], 0x60..0x65), where offset 0 is the data port, offset 4
//! the status/command port, and offsets 1..=3 read as zero and ignore writes.
//!
//! Interrupts: with a line given to [`I8042::set_irq`] (ISA IRQ 1), the line is held high while the output buffer
//! is full and the command byte enables the keyboard interrupt (bit 0), and dropped when the guest reads the byte
//! (also briefly between two queued bytes, so an edge-triggered input sees each one). Without a line none are
//! raised.
//!
//! Commands understood: 0x20 read command byte, 0x60 write command byte, 0xA7/0xA8 disable/enable the auxiliary
//! port, 0xAA self test (answers 0x55), 0xAB keyboard interface test (answers 0x00), 0xAD/0xAE disable/enable the
//! keyboard, 0xD0 read output port, 0xD1 write output port, 0xF0-0xFF pulse output lines (0xFE pulses the reset
//! line). Pulling the reset line (output port bit 0) low resets the machine through [`PlatformEvents::reset`].
//! Other commands are ignored.
//!
//! A byte written to the data port when no controller command waits for one goes to the keyboard, which answers
//! as a PS/2 keyboard with no keys pressed would: 0xFF (reset) with ACK (0xFA) and the self-test pass (0xAA), 0xF2
//! (identify) with ACK and the MF2 keyboard ID (0xAB 0x83), 0xED (LEDs), 0xF3 (typematic rate) and 0xF0 (scan code
//! set) with ACK for the command and ACK for its argument (0xF0 0x00 also reports set 2), 0xF4/0xF5/0xF6
//! (enable/disable/defaults) with ACK, 0xEE (echo) with 0xEE, and anything else with resend (0xFE). Replies queue
//! behind each other in the output buffer (at most [`OUTPUT_QUEUE_LEN`] waiting).

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use crate::platform::PlatformEvents;

/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64).
pub const COMMAND_OFFSET: u64 = 4;
/// Length of the range to insert the controller itself with.
pub const I8042_RANGE_LEN: u64 = 5;
/// Length of each range from [`I8042::bus_devices`].
pub const I8042_PORT_LEN: u64 = 1;
/// The most bytes that wait behind the output buffer.
pub const OUTPUT_QUEUE_LEN: usize = 16;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// The last write went to the command port.
const STATUS_COMMAND: u8 = 0x08;
/// The keyboard is not inhibited (the keylock is open).
const STATUS_UNLOCKED: u8 = 0x10;

// Command byte bits.
const CMD_BYTE_KBD_INTERRUPT: u8 = 0x01;
const CMD_BYTE_SYSTEM_FLAG: u8 = 0x04;
const CMD_BYTE_KBD_DISABLED: u8 = 0x10;
const CMD_BYTE_AUX_DISABLED: u8 = 0x20;
/// After firmware: system flag set, scan-code translation on, both ports enabled, interrupts off.
const CMD_BYTE_DEFAULT: u8 = 0x44;

/// Output port bit 0: the CPU reset line, active low.
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
/// Output port after firmware: reset line high, A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

// Commands.
const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_CODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// An MF2 keyboard (with translation off; firmware accepts either form).
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// The scan code set the keyboard reports.
const KBD_CURRENT_SET: u8 = 0x02;

/// The controller's registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct I8042State {
    /// The status register.
    pub status: u8,
    /// The command byte ("controller configuration byte").
    pub command_byte: u8,
    /// The output buffer (valid while the status register's output-full bit is set).
    pub output: u8,
    /// The output port.
    pub output_port: u8,
    /// A command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// Bytes waiting behind the output buffer, oldest first (at most [`OUTPUT_QUEUE_LEN`]).
    pub output_queue: Vec<u8>,
    /// A keyboard command waiting for its argument byte (0xED, 0xF0 or 0xF3).
    pub keyboard_command: Option<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            status: STATUS_SYSTEM_FLAG | STATUS_UNLOCKED,
            command_byte: CMD_BYTE_DEFAULT,
            output: 0,
            output_port: OUTPUT_PORT_DEFAULT,
            pending_command: None,
            output_queue: Vec::new(),
            keyboard_command: None,
        }
    }
}

/// The i8042 keyboard controller.
pub struct I8042 {
    state: I8042State,
    events: Arc<dyn PlatformEvents>,
    /// ISA IRQ 1, if wired.
    irq: Option<Arc<dyn InterruptLine>>,
    /// The level last driven on `irq`.
    irq_level: bool,
}

impl I8042 {
    /// Creates a controller in its after-firmware state that resets the machine through `events`.
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self::from_state(&I8042State::default(), events)
    }

    /// Rebuilds a controller from saved state (a pending command that takes no data byte is dropped, and so are
    /// queued bytes beyond [`OUTPUT_QUEUE_LEN`]).
    pub fn from_state(state: &I8042State, events: Arc<dyn PlatformEvents>) -> Self {
        let mut state = state.clone();
        if !matches!(
            state.pending_command,
            None | Some(CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT)
        ) {
            state.pending_command = None;
        }
        if !matches!(
            state.keyboard_command,
            None | Some(KBD_SET_LEDS | KBD_SCAN_CODE_SET | KBD_TYPEMATIC)
        ) {
            state.keyboard_command = None;
        }
        state.output_queue.truncate(OUTPUT_QUEUE_LEN);
        I8042 {
            state,
            events,
            irq: None,
            irq_level: false,
        }
    }

    /// Wires the keyboard interrupt to `irq` (ISA IRQ 1), or unwires it; the new line is driven to the current
    /// level at once.
    pub fn set_irq(&mut self, irq: Option<Arc<dyn InterruptLine>>) {
        if let Some(old) = self.irq.take() {
            if self.irq_level {
                if let Err(e) = old.set_level(false) {
                    tracing::warn!("i8042: cannot lower IRQ 1: {e}");
                }
            }
        }
        self.irq = irq;
        self.irq_level = false;
        self.update_irq();
    }

    /// Drives the interrupt line to match the output buffer and the command byte.
    fn update_irq(&mut self) {
        let level = self.state.status & STATUS_OUTPUT_FULL != 0
            && self.state.command_byte & CMD_BYTE_KBD_INTERRUPT != 0;
        let Some(irq) = &self.irq else {
            return;
        };
        if level != self.irq_level {
            if let Err(e) = irq.set_level(level) {
                tracing::warn!("i8042: cannot drive IRQ 1: {e}");
            }
            self.irq_level = level;
        }
    }

    /// The data port (offset 0 of its own range, 0x60 on a PC) and the status/command port (0x64) of `this` as two
    /// one-port bus devices, each to be inserted with [`I8042_PORT_LEN`]. The bus only holds weak references: keep
    /// them alive as long as the ports should answer.
    pub fn bus_devices(this: &Arc<Mutex<I8042>>) -> I8042Ports {
        let port = |offset| -> Arc<Mutex<dyn BusDevice>> {
            Arc::new(Mutex::new(I8042Port {
                i8042: this.clone(),
                offset,
            }))
        };
        I8042Ports {
            data: port(DATA_OFFSET),
            command: port(COMMAND_OFFSET),
        }
    }

    /// The current state.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Puts a byte in the output buffer for the guest to read from port 0x60, or behind it if it is full.
    fn respond(&mut self, value: u8) {
        if self.state.status & STATUS_OUTPUT_FULL == 0 {
            self.state.output = value;
            self.state.status |= STATUS_OUTPUT_FULL;
        } else if self.state.output_queue.len() < OUTPUT_QUEUE_LEN {
            self.state.output_queue.push(value);
        } else {
            tracing::debug!("i8042: output queue full, dropping {value:#04x}");
        }
    }

    /// A byte for the keyboard.
    fn keyboard(&mut self, value: u8) {
        if let Some(command) = self.state.keyboard_command.take() {
            // The argument of a two-byte command.
            self.respond(KBD_ACK);
            if command == KBD_SCAN_CODE_SET && value == 0 {
                self.respond(KBD_CURRENT_SET);
            }
            return;
        }
        match value {
            KBD_RESET => {
                self.respond(KBD_ACK);
                self.respond(KBD_SELF_TEST_PASSED);
            }
            KBD_IDENTIFY => {
                self.respond(KBD_ACK);
                KBD_ID.into_iter().for_each(|b| self.respond(b));
            }
            KBD_SET_LEDS | KBD_SCAN_CODE_SET | KBD_TYPEMATIC => {
                self.respond(KBD_ACK);
                self.state.keyboard_command = Some(value);
            }
            KBD_ENABLE | KBD_DISABLE | KBD_DEFAULTS => self.respond(KBD_ACK),
            KBD_ECHO => self.respond(KBD_ECHO),
            _ => {
                tracing::debug!("i8042: keyboard command {value:#04x} not understood");
                self.respond(KBD_RESEND);
            }
        }
    }

    fn set_command_byte(&mut self, value: u8) {
        self.state.command_byte = value;
        // The status register's system flag mirrors the command byte's.
        self.state.status =
            (self.state.status & !STATUS_SYSTEM_FLAG) | (value & CMD_BYTE_SYSTEM_FLAG);
    }

    fn set_output_port(&mut self, value: u8) {
        self.state.output_port = value;
        if value & OUTPUT_PORT_RESET_LINE == 0 {
            tracing::info!("i8042: reset line pulled low, resetting the VM");
            self.events.reset();
            // The line springs back once the machine resets.
            self.state.output_port |= OUTPUT_PORT_RESET_LINE;
        }
    }

    fn command(&mut self, cmd: u8) {
        self.state.status |= STATUS_COMMAND;
        self.state.pending_command = None;
        match cmd {
            CMD_READ_COMMAND_BYTE => self.respond(self.state.command_byte),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT => {
                self.state.pending_command = Some(cmd)
            }
            CMD_DISABLE_AUX => self.state.command_byte |= CMD_BYTE_AUX_DISABLED,
            CMD_ENABLE_AUX => self.state.command_byte &= !CMD_BYTE_AUX_DISABLED,
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_INTERFACE_TEST => self.respond(INTERFACE_TEST_PASSED),
            CMD_DISABLE_KBD => self.state.command_byte |= CMD_BYTE_KBD_DISABLED,
            CMD_ENABLE_KBD => self.state.command_byte &= !CMD_BYTE_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.respond(self.state.output_port),
            CMD_PULSE_FIRST..=0xff => {
                // Bits 0..=3 clear mean "pulse this output line"; line 0 is the reset line.
                if cmd & OUTPUT_PORT_RESET_LINE == 0 {
                    tracing::info!("i8042: reset pulse, resetting the VM");
                    self.events.reset();
                }
            }
            _ => tracing::debug!("i8042: ignoring unsupported command {cmd:#04x}"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.state.status &= !STATUS_COMMAND;
        match self.state.pending_command.take() {
            Some(CMD_WRITE_COMMAND_BYTE) => self.set_command_byte(value),
            Some(CMD_WRITE_OUTPUT_PORT) => self.set_output_port(value),
            _ => self.keyboard(value),
        }
    }

    fn read_data(&mut self) -> u8 {
        // Reading empties the buffer; like the real chip, the last byte stays readable.
        let value = self.state.output;
        self.state.status &= !STATUS_OUTPUT_FULL;
        if !self.state.output_queue.is_empty() {
            // The interrupt drops before the next byte raises it again.
            self.update_irq();
            let next = self.state.output_queue.remove(0);
            self.respond(next);
        }
        value
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The controller's registers are single bytes: a wider access reads as zero and has no side effects.
        match (offset, data) {
            (DATA_OFFSET, [byte]) => *byte = self.read_data(),
            (COMMAND_OFFSET, [byte]) => *byte = self.state.status,
            (_, data) => data.fill(0),
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            tracing::debug!(
                "i8042: ignoring a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        match offset {
            DATA_OFFSET => self.write_data(*value),
            COMMAND_OFFSET => self.command(*value),
            _ => {}
        }
        self.update_irq();
    }
}

/// The controller's two ports as separate bus devices, made by [`I8042::bus_devices`].
pub struct I8042Ports {
    /// The data port: insert at 0x60 with [`I8042_PORT_LEN`].
    pub data: Arc<Mutex<dyn BusDevice>>,
    /// The status (read) and command (write) port: insert at 0x64 with [`I8042_PORT_LEN`].
    pub command: Arc<Mutex<dyn BusDevice>>,
}

/// One of the controller's ports on its own.
struct I8042Port {
    i8042: Arc<Mutex<I8042>>,
    /// The port's offset in the controller's five-port layout.
    offset: u64,
}

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            data.fill(0);
            return;
        }
        let mut i8042 = self.i8042.lock().unwrap_or_else(|p| p.into_inner());
        i8042.read(self.offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            tracing::debug!("i8042: ignoring a write at offset {offset} of a one-port range");
            return;
        }
        let mut i8042 = self.i8042.lock().unwrap_or_else(|p| p.into_inner());
        i8042.write(self.offset, data);
    }
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Events {
        resets: AtomicUsize,
        other: AtomicUsize,
    }

    impl PlatformEvents for Events {
        fn power_off(&self) {
            self.other.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn debug_exit(&self, _code: u8) {
            self.other.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn setup() -> (I8042, Arc<Events>) {
        let events = Arc::new(Events::default());
        (I8042::new(events.clone()), events)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_resets() {
        let (mut dev, events) = setup();
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
        // 0xFF pulses nothing.
        dev.write(COMMAND_OFFSET, &[0xff]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
        assert_eq!(events.other.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn self_test_and_interface_test() {
        let (mut dev, events) = setup();
        assert_eq!(inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(
            inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL,
            STATUS_OUTPUT_FULL
        );
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[0xab]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0x00);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn command_byte_round_trip_and_system_flag() {
        let (mut dev, _events) = setup();
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), CMD_BYTE_DEFAULT);
        assert_eq!(
            inb(&mut dev, COMMAND_OFFSET) & STATUS_SYSTEM_FLAG,
            STATUS_SYSTEM_FLAG
        );

        dev.write(COMMAND_OFFSET, &[0x60]);
        assert_eq!(
            inb(&mut dev, COMMAND_OFFSET) & STATUS_COMMAND,
            STATUS_COMMAND
        );
        dev.write(DATA_OFFSET, &[0x61]);
        assert_eq!(inb(&mut dev, COMMAND_OFFSET) & STATUS_COMMAND, 0);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0x61);
        assert_eq!(inb(&mut dev, COMMAND_OFFSET) & STATUS_SYSTEM_FLAG, 0);

        // Port enable/disable commands edit the command byte: disable the keyboard, enable the aux port.
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(COMMAND_OFFSET, &[0xa8]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), (0x61 | 0x10) & !0x20);
    }

    #[test]
    fn output_port_read_and_reset_line() {
        let (mut dev, events) = setup();
        dev.write(COMMAND_OFFSET, &[0xd0]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), OUTPUT_PORT_DEFAULT);
        // Toggling A20 keeps the reset line high.
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(DATA_OFFSET, &[0xdf]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn unknown_commands_and_stray_bytes_are_ignored() {
        let (mut dev, events) = setup();
        let before = dev.state();
        dev.write(COMMAND_OFFSET, &[0xc0]);
        dev.write(COMMAND_OFFSET, &[0xaa, 0xfe]); // not a byte access
        dev.write(2, &[0xfe]);
        assert_eq!(inb(&mut dev, 1), 0);
        let after = dev.state();
        assert_eq!(after.command_byte, before.command_byte);
        assert_eq!(after.status & STATUS_OUTPUT_FULL, 0);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
        // A command cancels a half-finished one.
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(COMMAND_OFFSET, &[0xab]);
        dev.write(DATA_OFFSET, &[0x00]);
        assert_eq!(dev.state().command_byte, before.command_byte);
    }

    #[test]
    fn state_round_trip() {
        let (mut dev, events) = setup();
        dev.write(COMMAND_OFFSET, &[0x60]);
        let state = dev.state();
        assert_eq!(state.pending_command, Some(0x60));
        let mut restored = I8042::from_state(&state, events);
        assert_eq!(restored.state(), state);
        restored.write(DATA_OFFSET, &[0x07]);
        assert_eq!(restored.state().command_byte, 0x07);

        let odd = I8042State {
            pending_command: Some(0xaa),
            ..I8042State::default()
        };
        assert_eq!(
            I8042::from_state(&odd, Arc::new(Events::default()))
                .state()
                .pending_command,
            None
        );
    }

    /// Reads one byte the guest waits for: the output buffer must be full, with keyboard (not mouse) data.
    fn expect_byte(dev: &mut I8042) -> u8 {
        let status = inb(dev, COMMAND_OFFSET);
        assert_eq!(
            status & (STATUS_OUTPUT_FULL | 0x20),
            STATUS_OUTPUT_FULL,
            "{status:#x}"
        );
        inb(dev, DATA_OFFSET)
    }

    fn assert_empty(dev: &mut I8042) {
        assert_eq!(inb(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_reset_and_identify() {
        let (mut dev, events) = setup();
        dev.write(DATA_OFFSET, &[0xff]);
        assert_eq!(expect_byte(&mut dev), 0xfa);
        assert_eq!(expect_byte(&mut dev), 0xaa);
        assert_empty(&mut dev);
        dev.write(DATA_OFFSET, &[0xf2]);
        assert_eq!(expect_byte(&mut dev), 0xfa);
        assert_eq!(expect_byte(&mut dev), 0xab);
        assert_eq!(expect_byte(&mut dev), 0x83);
        assert_empty(&mut dev);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let (mut dev, _events) = setup();
        let mut answers = |bytes: &[u8]| {
            for b in bytes {
                dev.write(DATA_OFFSET, &[*b]);
            }
            let mut got = Vec::new();
            while inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
                got.push(inb(&mut dev, DATA_OFFSET));
            }
            got
        };
        assert_eq!(answers(&[0xf5]), [0xfa]);
        assert_eq!(answers(&[0xf4]), [0xfa]);
        assert_eq!(answers(&[0xf6]), [0xfa]);
        assert_eq!(answers(&[0xed, 0x07]), [0xfa, 0xfa]);
        assert_eq!(answers(&[0xf3, 0x20]), [0xfa, 0xfa]);
        assert_eq!(answers(&[0xf0, 0x02]), [0xfa, 0xfa]);
        assert_eq!(answers(&[0xf0, 0x00]), [0xfa, 0xfa, 0x02]);
        assert_eq!(answers(&[0xee]), [0xee]);
        assert_eq!(answers(&[0x12]), [0xfe]);
        assert_eq!(answers(&[0xf7]), [0xfe]);
        // The argument byte is taken as an argument even if it looks like a command.
        assert_eq!(answers(&[0xed]), [0xfa]);
        assert_eq!(answers(&[0xff]), [0xfa]);
        assert_eq!(answers(&[0xf4]), [0xfa]);
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut dev, _events) = setup();
        for _ in 0..10 {
            dev.write(DATA_OFFSET, &[0xf2]);
        }
        assert_eq!(dev.state().output_queue.len(), OUTPUT_QUEUE_LEN);
        let mut got = Vec::new();
        while inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            got.push(inb(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got.len(), OUTPUT_QUEUE_LEN + 1);
        assert_eq!(&got[..6], &[0xfa, 0xab, 0x83, 0xfa, 0xab, 0x83]);
        // A controller reply queues behind keyboard bytes too.
        dev.write(DATA_OFFSET, &[0xf4]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(expect_byte(&mut dev), 0xfa);
        assert_eq!(expect_byte(&mut dev), 0x55);
    }

    /// SeaBIOS's keyboard initialisation, through the two one-port devices at their PC ports.
    #[test]
    fn firmware_keyboard_init_through_split_ports() {
        use crate::bus::Bus;

        let events = Arc::new(Events::default());
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
        let ports = I8042::bus_devices(&i8042);
        let bus = Bus::new();
        bus.insert(ports.data.clone(), 0x60, I8042_PORT_LEN)
            .unwrap();
        bus.insert(ports.command.clone(), 0x64, I8042_PORT_LEN)
            .unwrap();
        // Port 0x61 is free for system control port B.
        assert!(!bus.write(0x61, &[0]));
        let outb = |port: u64, value: u8| assert!(bus.write(port, &[value]));
        let inb = |port: u64| {
            let mut b = [0u8];
            assert!(bus.read(port, &mut b));
            b[0]
        };
        let recv = || {
            assert_eq!(inb(0x64) & 0x21, 0x01);
            inb(0x60)
        };
        let ctr = |value: u8| {
            outb(0x64, 0x60);
            outb(0x60, value);
        };

        // Flush, controller self test, keyboard interface test.
        assert_eq!(inb(0x64) & 0x01, 0);
        outb(0x64, 0xaa);
        assert_eq!(recv(), 0x55);
        outb(0x64, 0xab);
        assert_eq!(recv(), 0x00);
        // Each keyboard command: interrupts and ports off, keyboard port on, command, CTR restored.
        let kbd_command = |bytes: &[u8], replies: usize| -> Vec<u8> {
            ctr(0x30);
            ctr(0x20);
            let mut got = Vec::new();
            for b in bytes {
                outb(0x60, *b);
                assert_eq!(recv(), 0xfa);
            }
            for _ in 0..replies {
                got.push(recv());
            }
            ctr(0x30);
            got
        };
        assert_eq!(kbd_command(&[0xff], 1), [0xaa]);
        assert_eq!(kbd_command(&[0xf5], 0), []);
        assert_eq!(kbd_command(&[0xf0, 0x02], 0), []);
        assert_eq!(kbd_command(&[0xf4], 0), []);
        assert_eq!(inb(0x64) & 0x01, 0);
        outb(0x64, 0x20);
        assert_eq!(recv(), 0x30);

        // The reset line works through the command port.
        outb(0x64, 0xfe);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
        // The one-port devices ignore other offsets.
        let mut b = [0xffu8];
        ports.data.lock().unwrap().read(1, &mut b);
        assert_eq!(b, [0]);
        ports.command.lock().unwrap().write(1, &[0xfe]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn irq1_follows_the_output_buffer_when_enabled() {
        #[derive(Default)]
        struct Line(Mutex<Vec<bool>>);
        impl InterruptLine for Line {
            fn trigger(&self) -> std::io::Result<()> {
                panic!("IRQ 1 is driven as a level");
            }
            fn set_level(&self, asserted: bool) -> std::io::Result<()> {
                self.0.lock().unwrap().push(asserted);
                Ok(())
            }
        }
        let (mut dev, _events) = setup();
        let line = Arc::new(Line::default());
        dev.set_irq(Some(line.clone()));
        // Interrupts are off in the default command byte.
        dev.write(DATA_OFFSET, &[0xf4]);
        assert!(line.0.lock().unwrap().is_empty());
        // Enabling them with a byte waiting raises the line (the command byte write itself consumed nothing).
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x45]);
        assert_eq!(*line.0.lock().unwrap(), [true]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0xfa);
        assert_eq!(*line.0.lock().unwrap(), [true, false]);
        // Each queued byte is a new edge.
        dev.write(DATA_OFFSET, &[0xff]);
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0xfa);
        assert_eq!(inb(&mut dev, DATA_OFFSET), 0xaa);
        assert_eq!(
            *line.0.lock().unwrap(),
            [true, false, true, false, true, false]
        );
        // Reading the status port changes nothing; unwiring drops a raised line.
        dev.write(COMMAND_OFFSET, &[0xaa]);
        inb(&mut dev, COMMAND_OFFSET);
        dev.set_irq(None);
        assert_eq!(
            *line.0.lock().unwrap(),
            [true, false, true, false, true, false, true, false]
        );
    }

    #[test]
    fn keyboard_state_round_trip() {
        let (mut dev, events) = setup();
        dev.write(DATA_OFFSET, &[0xf2]);
        dev.write(DATA_OFFSET, &[0xed]);
        let state = dev.state();
        assert_eq!(state.output, 0xfa);
        assert_eq!(state.output_queue, [0xab, 0x83, 0xfa]);
        assert_eq!(state.keyboard_command, Some(0xed));
        let mut restored = I8042::from_state(&state, events.clone());
        assert_eq!(restored.state(), state);
        restored.write(DATA_OFFSET, &[0x00]);
        assert_eq!(restored.state().output_queue, [0xab, 0x83, 0xfa, 0xfa]);

        let odd = I8042State {
            keyboard_command: Some(0xff),
            output_queue: vec![0x11; 100],
            ..I8042State::default()
        };
        let cleaned = I8042::from_state(&odd, events).state();
        assert_eq!(cleaned.keyboard_command, None);
        assert_eq!(cleaned.output_queue.len(), OUTPUT_QUEUE_LEN);
    }
}
