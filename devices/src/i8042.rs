//! The i8042 keyboard controller, reduced to what an OS probes and the reset line.
//!
//! Inserted as one range of five ports (0x60..0x65 on a PC): offset 0 is the data port, offset 4 the status
//! (read) and command (write) port. Offsets 1..=3 are other chips' ports on a real PC (0x61 is system control
//! port B); here they read as zero and ignore writes. No keyboard or mouse is attached and no interrupts are raised.
//!
//! Commands understood: 0x20 read command byte, 0x60 write command byte, 0xA7/0xA8 disable/enable the auxiliary
//! port, 0xAA self test (answers 0x55), 0xAB keyboard interface test (answers 0x00), 0xAD/0xAE disable/enable the
//! keyboard, 0xD0 read output port, 0xD1 write output port, 0xF0-0xFF pulse output lines (0xFE pulses the reset
//! line). Pulling the reset line (output port bit 0) low resets the machine through [`PlatformEvents::reset`].
//! Other commands are ignored.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::platform::PlatformEvents;

/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64).
pub const COMMAND_OFFSET: u64 = 4;
/// Length of the range to insert the controller with.
pub const I8042_RANGE_LEN: u64 = 5;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// The last write went to the command port.
const STATUS_COMMAND: u8 = 0x08;
/// The keyboard is not inhibited (the keylock is open).
const STATUS_UNLOCKED: u8 = 0x10;

// Command byte bits.
const CMD_BYTE_SYSTEM_FLAG: u8 = 0x04;
const CMD_BYTE_KBD_DISABLED: u8 = 0x10;
const CMD_BYTE_AUX_DISABLED: u8 = 0x20;
/// After firmware: system flag set, scan-code translation on, both ports enabled, interrupts off (no IRQ is wired).
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
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            status: STATUS_SYSTEM_FLAG | STATUS_UNLOCKED,
            command_byte: CMD_BYTE_DEFAULT,
            output: 0,
            output_port: OUTPUT_PORT_DEFAULT,
            pending_command: None,
        }
    }
}

/// The i8042 keyboard controller.
pub struct I8042 {
    state: I8042State,
    events: Arc<dyn PlatformEvents>,
}

impl I8042 {
    /// Creates a controller in its after-firmware state that resets the machine through `events`.
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self::from_state(&I8042State::default(), events)
    }

    /// Rebuilds a controller from saved state (a pending command that takes no data byte is dropped).
    pub fn from_state(state: &I8042State, events: Arc<dyn PlatformEvents>) -> Self {
        let mut state = state.clone();
        if !matches!(
            state.pending_command,
            None | Some(CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT)
        ) {
            state.pending_command = None;
        }
        I8042 { state, events }
    }

    /// The current state.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Puts a byte in the output buffer for the guest to read from port 0x60.
    fn respond(&mut self, value: u8) {
        self.state.output = value;
        self.state.status |= STATUS_OUTPUT_FULL;
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
            // A byte for the keyboard: none is attached, so it goes nowhere.
            _ => tracing::debug!("i8042: dropping byte {value:#04x} sent to the (absent) keyboard"),
        }
    }

    fn read_data(&mut self) -> u8 {
        // Reading empties the buffer; like the real chip, the last byte stays readable.
        self.state.status &= !STATUS_OUTPUT_FULL;
        self.state.output
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
        dev.write(DATA_OFFSET, &[0xff]); // a keyboard reset: no keyboard
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
}
