//! The POST code port (0x80 on a PC): firmware and kernels write progress codes here, and some use it as a short
//! I/O delay. Reads return the last code written.

use crate::bus::BusDevice;

/// The last POST code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port80State {
    /// The last byte written (0 after reset).
    pub last_code: u8,
}

/// The POST code sink.
#[derive(Debug, Default)]
pub struct Port80 {
    state: Port80State,
}

impl Port80 {
    /// Creates the port with code 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the port from saved state.
    pub fn from_state(state: &Port80State) -> Self {
        Port80 {
            state: state.clone(),
        }
    }

    /// The current state.
    pub fn state(&self) -> Port80State {
        self.state.clone()
    }

    /// The last code the guest wrote.
    pub fn last_code(&self) -> u8 {
        self.state.last_code
    }
}

impl BusDevice for Port80 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.state.last_code);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // The low byte is the code; a wider write carries it in its first byte.
        if let Some(&code) = data.first() {
            tracing::trace!("POST code {code:#04x}");
            self.state.last_code = code;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_code() {
        let mut port = Port80::new();
        let mut b = [0xffu8];
        port.read(0, &mut b);
        assert_eq!(b, [0]);
        port.write(0, &[0x12]);
        port.write(0, &[0x34]);
        port.read(0, &mut b);
        assert_eq!(b, [0x34]);
        assert_eq!(port.last_code(), 0x34);
        port.write(0, &[]);
        assert_eq!(port.last_code(), 0x34);
        let restored = Port80::from_state(&port.state());
        assert_eq!(restored.state(), Port80State { last_code: 0x34 });
    }
}
