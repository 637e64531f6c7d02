use super::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A clock the test moves by hand.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicU64>);

impl Clock for TestClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl TestClock {
    /// Moves the clock to the first nanosecond of tick `tick`.
    fn set_tick(&self, tick: u64) {
        self.0.store(ticks_to_nanos(tick), Ordering::SeqCst);
    }
}

/// The time from the first nanosecond of tick `from` to that of tick `to`.
fn span(from: u64, to: u64) -> Duration {
    Duration::from_nanos(ticks_to_nanos(to) - ticks_to_nanos(from))
}

/// Counts pulses on IRQ 0.
#[derive(Default)]
struct Pulses(AtomicUsize);

impl InterruptLine for Pulses {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_level(&self, _asserted: bool) -> std::io::Result<()> {
        panic!("the PIT only pulses IRQ 0");
    }
}

struct Rig {
    pit: Arc<Mutex<Pit>>,
    ports: PitBusDevices,
    clock: TestClock,
    irqs: Arc<Pulses>,
}

impl Rig {
    /// A PIT whose clock starts at tick `start`.
    fn new(start: u64) -> Self {
        let clock = TestClock::default();
        clock.set_tick(start);
        let irqs = Arc::new(Pulses::default());
        let pit = Pit::with_clock(irqs.clone(), Box::new(clock.clone())).unwrap();
        let pit = Arc::new(Mutex::new(pit));
        let ports = pit_bus_devices(&pit);
        Rig {
            pit,
            ports,
            clock,
            irqs,
        }
    }

    fn outb(&self, port: u16, value: u8) {
        let (dev, offset) = self.port(port);
        dev.lock().unwrap().write(offset, &[value]);
    }

    fn inb(&self, port: u16) -> u8 {
        let (dev, offset) = self.port(port);
        let mut b = [0xa5u8];
        dev.lock().unwrap().read(offset, &mut b);
        b[0]
    }

    fn port(&self, port: u16) -> (&Arc<Mutex<dyn BusDevice>>, u64) {
        match port {
            0x40..=0x43 => (&self.ports.counters, u64::from(port - 0x40)),
            0x61 => (&self.ports.port_b, 0),
            _ => panic!("not a PIT port: {port:#x}"),
        }
    }

    /// Programs `channel` with a low-then-high count in `mode`.
    fn program(&self, channel: u8, mode: u8, count: u16) {
        self.outb(0x43, channel << 6 | 0x30 | mode << 1);
        let [low, high] = count.to_le_bytes();
        self.outb(0x40 + u16::from(channel), low);
        self.outb(0x40 + u16::from(channel), high);
    }

    /// Latches `channel`'s count and reads it (low, then high).
    fn latched_count(&self, channel: u8) -> u16 {
        self.outb(0x43, channel << 6);
        let port = 0x40 + u16::from(channel);
        u16::from_le_bytes([self.inb(port), self.inb(port)])
    }

    fn irqs(&self) -> usize {
        self.irqs.0.load(Ordering::SeqCst)
    }

    fn handle_timer(&self) {
        self.pit.lock().unwrap().handle_timer();
    }

    fn armed_for(&self) -> Option<Duration> {
        self.pit.lock().unwrap().armed_for
    }

    /// How long the real timerfd will wait, and its interval.
    fn timerfd_setting(&self) -> (Duration, Duration) {
        let fd = self.pit.lock().unwrap().timer_fd();
        // SAFETY: all-zero bytes are a valid `itimerspec`.
        let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is the PIT's open timerfd and `spec` is a valid, writable itimerspec that outlives the call.
        let ret = unsafe { libc::timerfd_gettime(fd, &mut spec) };
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
        let duration = |t: libc::timespec| Duration::new(t.tv_sec as u64, t.tv_nsec as u32);
        (duration(spec.it_value), duration(spec.it_interval))
    }
}

#[test]
fn tick_conversions_round_the_right_way() {
    assert_eq!(nanos_to_ticks(1_000_000_000), PIT_FREQUENCY_HZ);
    assert_eq!(ticks_to_nanos(PIT_FREQUENCY_HZ), 1_000_000_000);
    for tick in [0, 1, 2, 65535, 65536, 1 << 40] {
        assert_eq!(nanos_to_ticks(ticks_to_nanos(tick)), tick);
        assert_eq!(
            nanos_to_ticks(ticks_to_nanos(tick) - u64::from(tick > 0)),
            tick.saturating_sub(1)
        );
    }
    assert!(nanos_to_ticks(u64::MAX) < u64::MAX);
    assert_eq!(ticks_to_nanos(u64::MAX), u64::MAX);
}

#[test]
fn mode2_count_decreases_and_wraps() {
    let rig = Rig::new(5000);
    rig.program(0, 2, 1000);
    assert_eq!(rig.latched_count(0), 1000);
    rig.clock.set_tick(5001);
    assert_eq!(rig.latched_count(0), 999);
    rig.clock.set_tick(5999);
    assert_eq!(rig.latched_count(0), 1);
    rig.clock.set_tick(6000);
    assert_eq!(rig.latched_count(0), 1000, "reloaded");
    rig.clock.set_tick(6250);
    assert_eq!(rig.latched_count(0), 750);
    // Count 0 is 65536.
    rig.program(0, 2, 0);
    assert_eq!(rig.latched_count(0), 0);
    rig.clock.set_tick(6251);
    assert_eq!(rig.latched_count(0), 0xffff);
}

#[test]
fn latch_freezes_the_count_until_read() {
    let rig = Rig::new(0);
    rig.program(2, 2, 500);
    rig.outb(0x61, 0x01);
    rig.clock.set_tick(100);
    rig.outb(0x43, 0x80);
    rig.clock.set_tick(200);
    // A second latch before the first is read changes nothing.
    rig.outb(0x43, 0x80);
    assert_eq!(rig.inb(0x42), 400u16.to_le_bytes()[0]);
    rig.clock.set_tick(300);
    assert_eq!(rig.inb(0x42), 400u16.to_le_bytes()[1]);
    // Read out: the next latch takes a new value.
    assert_eq!(rig.latched_count(2), 200);
}

#[test]
fn access_modes_order_the_bytes() {
    let rig = Rig::new(0);
    // Low byte only: the high byte is zero.
    rig.outb(0x43, 0x54); // channel 1, low byte, mode 2
    rig.outb(0x41, 0x80);
    assert_eq!(rig.inb(0x41), 0x80);
    assert_eq!(rig.inb(0x41), 0x80);
    rig.clock.set_tick(0x10);
    assert_eq!(rig.inb(0x41), 0x70);
    // High byte only: the low byte is zero.
    rig.outb(0x43, 0x64); // channel 1, high byte, mode 2
    rig.outb(0x41, 0x12);
    assert_eq!(rig.inb(0x41), 0x12);
    rig.outb(0x43, 0x40);
    assert_eq!(rig.inb(0x41), 0x12);
    // Low then high, both ways; unlatched reads alternate too.
    rig.outb(0x43, 0x74);
    rig.outb(0x41, 0x34);
    assert_eq!(
        rig.pit.lock().unwrap().state().channels[1].write_low,
        Some(0x34)
    );
    rig.outb(0x41, 0x12);
    assert_eq!(rig.inb(0x41), 0x34);
    assert_eq!(rig.inb(0x41), 0x12);
    rig.clock.set_tick(0x10 + 4);
    assert_eq!(rig.inb(0x41), 0x30);
    assert_eq!(rig.inb(0x41), 0x12);
    // A control word resets the byte order.
    assert_eq!(rig.inb(0x41), 0x30);
    rig.outb(0x43, 0x74);
    rig.outb(0x41, 0x00);
    rig.outb(0x41, 0x01);
    assert_eq!(rig.inb(0x41), 0x00);
    assert_eq!(rig.inb(0x41), 0x01);
}

#[test]
fn read_back_status_and_count() {
    let rig = Rig::new(0);
    rig.outb(0x43, 0x34); // channel 0, low/high, mode 2
                          // Control word written, no count yet: null count set, output high.
    rig.outb(0x43, 0xe2); // read back the status of channel 0
    assert_eq!(rig.inb(0x40), 0x80 | 0x40 | 0x30 | 0x04);
    rig.outb(0x40, 0x00);
    rig.outb(0x40, 0x10);
    rig.clock.set_tick(0x100);
    // Status and count of channels 0 and 2: the status comes first.
    rig.outb(0x43, 0xb6); // channel 2, low/high, mode 3, BCD off
    rig.outb(0x43, 0xca); // read back status and count of channels 0 and 2
    assert_eq!(rig.inb(0x40), 0x80 | 0x30 | 0x04);
    rig.clock.set_tick(0x200);
    assert_eq!(rig.inb(0x40), 0x00);
    assert_eq!(rig.inb(0x40), 0x0f);
    assert_eq!(rig.inb(0x42), 0x80 | 0x40 | 0x30 | 0x06);
    // The count alone; the mode and BCD bit are reported as written.
    rig.outb(0x43, 0xd2);
    assert_eq!(rig.inb(0x40), 0x00);
    assert_eq!(rig.inb(0x40), 0x0e);
    rig.outb(0x43, 0x31); // mode 0, BCD
    rig.outb(0x43, 0xe2);
    assert_eq!(
        rig.inb(0x40),
        0x40 | 0x30 | 0x01,
        "mode 0 output low, BCD set"
    );
    // The control word register reads as zero.
    assert_eq!(rig.inb(0x43), 0);
}

#[test]
fn port_b_gates_channel2_and_shows_its_output() {
    // Linux's and SeaBIOS's calibration: gate high, speaker off, mode 0, a count, poll bit 5.
    let rig = Rig::new(1000);
    assert_eq!(rig.inb(0x61) & 0x23, 0);
    let b = rig.inb(0x61);
    rig.outb(0x61, (b & !0x02) | 0x01);
    rig.outb(0x43, 0xb0);
    rig.outb(0x42, 0xe8);
    rig.outb(0x42, 0x03);
    assert_eq!(rig.inb(0x61) & 0x20, 0);
    rig.clock.set_tick(1999);
    assert_eq!(rig.inb(0x61) & 0x20, 0);
    rig.clock.set_tick(2000);
    assert_eq!(rig.inb(0x61) & 0x23, 0x21);
    rig.clock.set_tick(90_000);
    assert_eq!(rig.inb(0x61) & 0x20, 0x20, "stays high");

    // A low gate pauses mode 0.
    rig.program(2, 0, 100);
    rig.clock.set_tick(90_050);
    rig.outb(0x61, 0x02);
    assert_eq!(rig.inb(0x61) & 0x2f, 0x02);
    rig.clock.set_tick(99_000);
    assert_eq!(rig.latched_count(2), 50);
    rig.outb(0x61, 0x03);
    rig.clock.set_tick(99_049);
    assert_eq!(rig.inb(0x61) & 0x20, 0);
    rig.clock.set_tick(99_050);
    assert_eq!(rig.inb(0x61) & 0x20, 0x20);
    // Bits 2 and 3 read back; the error flags read as zero.
    rig.outb(0x61, 0xfc);
    assert_eq!(rig.inb(0x61) & 0xcf, 0x0c);
}

#[test]
fn port_b_refresh_bit_toggles_with_time() {
    let rig = Rig::new(0);
    let refresh = |tick| {
        rig.clock.set_tick(tick);
        rig.inb(0x61) & 0x10
    };
    assert_eq!(refresh(0), 0);
    assert_eq!(refresh(17), 0);
    assert_eq!(refresh(18), 0x10);
    assert_eq!(refresh(35), 0x10);
    assert_eq!(refresh(36), 0);
}

#[test]
fn channel0_arms_the_timer_for_its_period() {
    let rig = Rig::new(10_000);
    assert_eq!(rig.armed_for(), None);
    // SeaBIOS's 18.2 Hz tick: mode 3, count 0 (65536).
    rig.outb(0x43, 0x36);
    rig.outb(0x40, 0x00);
    assert_eq!(rig.armed_for(), None, "half a count programs nothing");
    rig.outb(0x40, 0x00);
    let period = span(10_000, 10_000 + 65536);
    assert_eq!(period.as_micros(), 54_925);
    assert_eq!(rig.armed_for(), Some(period));
    let (value, interval) = rig.timerfd_setting();
    assert!(value > Duration::ZERO && value <= period, "{value:?}");
    assert_eq!(interval, Duration::ZERO);

    // Not yet due: no interrupt, same deadline.
    rig.clock.set_tick(10_000 + 65535);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 0);
    assert_eq!(rig.armed_for(), Some(span(75_535, 75_536)));

    // Due: one interrupt, armed for the next period.
    rig.clock.set_tick(10_000 + 65536);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
    assert_eq!(rig.armed_for(), Some(span(75_536, 75_536 + 65536)));
    // A spurious wake-up at the same time delivers nothing more.
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);

    // A control word without a count stops channel 0 and disarms the timer.
    rig.outb(0x43, 0x34);
    assert_eq!(rig.armed_for(), None);
    let (value, _) = rig.timerfd_setting();
    assert_eq!(value, Duration::ZERO);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
}

#[test]
fn missed_periods_give_one_interrupt() {
    let rig = Rig::new(0);
    rig.program(0, 2, 10_000);
    rig.clock.set_tick(35_000);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
    // The next one at the next period boundary.
    assert_eq!(rig.armed_for(), Some(span(35_000, 40_000)));
    rig.clock.set_tick(40_000);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 2);
}

#[test]
fn tiny_periods_are_spaced_out() {
    let rig = Rig::new(0);
    rig.program(0, 2, 2);
    assert_eq!(
        rig.armed_for(),
        Some(Duration::from_nanos(ticks_to_nanos(2)))
    );
    rig.clock.set_tick(2);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
    let spacing = rig.armed_for().unwrap();
    assert_eq!(spacing, span(2, 2 + 239));
    assert!(spacing >= Duration::from_micros(200), "{spacing:?}");
}

#[test]
fn mode0_on_channel0_interrupts_once() {
    let rig = Rig::new(0);
    rig.program(0, 0, 1000);
    rig.clock.set_tick(999);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 0);
    rig.clock.set_tick(1500);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
    assert_eq!(rig.armed_for(), None);
    rig.clock.set_tick(200_000);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 1);
    // Writing a new count starts another one-shot.
    rig.program(0, 0, 10);
    rig.clock.set_tick(200_010);
    rig.handle_timer();
    assert_eq!(rig.irqs(), 2);
}

#[test]
fn the_real_timer_fires() {
    // No clock tricks: a 1-tick one-shot is due at once; the timerfd becomes readable and handling it raises
    // IRQ 0. Waiting for readability is not a timed assertion: poll blocks until the kernel timer fires.
    let irqs = Arc::new(Pulses::default());
    let mut pit = Pit::new(irqs.clone()).unwrap();
    pit.write_counters(3, 0x30);
    pit.write_counters(0, 1);
    pit.write_counters(0, 0);
    let mut fds = [libc::pollfd {
        fd: pit.timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
    assert_eq!(ready, 1);
    pit.handle_timer();
    assert_eq!(irqs.0.load(Ordering::SeqCst), 1);
    assert_eq!(pit.armed_for, None);
    // The expiration was consumed: the descriptor is no longer readable.
    // SAFETY: as above; a zero timeout returns at once.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    assert_eq!(ready, 0);
}

#[test]
fn state_round_trip() {
    let rig = Rig::new(1000);
    rig.program(0, 3, 0);
    rig.program(2, 0, 5000);
    rig.outb(0x61, 0x03);
    rig.outb(0x43, 0x40); // latch channel 1
    rig.outb(0x43, 0x74);
    rig.outb(0x41, 0x99); // half a count on channel 1
    rig.clock.set_tick(3000);
    let state = rig.pit.lock().unwrap().state();
    assert_eq!(state.channels[0].elapsed, 2000);
    assert_eq!(state.channels[2].elapsed, 2000);
    assert_eq!(state.channels[1].write_low, Some(0x99));
    assert_eq!(state.port_b, 0x03);

    // Restored on a PIT whose clock reads something else entirely.
    let other = Rig::new(7_000_000);
    other.pit.lock().unwrap().set_state(&state).unwrap();
    assert_eq!(other.pit.lock().unwrap().state(), state);
    assert_eq!(other.latched_count(2), 3000);
    assert_eq!(other.latched_count(0), rig.latched_count(0));
    // Channel 0's next edge is 65536 - 2000 ticks away.
    assert_eq!(other.armed_for(), Some(span(7_000_000, 7_000_000 + 63_536)));
    other.clock.set_tick(7_000_000 + 3000);
    assert_eq!(other.inb(0x61) & 0x20, 0x20);

    // Impossible values are normalised: mode 7 is mode 3, channel 0's gate is tied high, channel 2's follows
    // port B.
    let mut odd = state.clone();
    odd.channels[0].mode = 7;
    odd.channels[0].gate = false;
    odd.channels[2].gate = false;
    odd.port_b = 0xff;
    other.pit.lock().unwrap().set_state(&odd).unwrap();
    let cleaned = other.pit.lock().unwrap().state();
    assert_eq!(cleaned.channels[0].mode, 3);
    assert!(cleaned.channels[0].gate && cleaned.channels[2].gate);
    assert_eq!(cleaned.port_b, 0x0f);
}

/// A small xorshift generator, so the garbage test is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_never_panics() {
    // Every control word, followed by every kind of access.
    for control in 0..=255u8 {
        let rig = Rig::new(12_345);
        rig.outb(0x43, control);
        for port in [0x40, 0x41, 0x42] {
            rig.outb(port, control);
            rig.outb(port, !control);
            rig.inb(port);
            rig.inb(port);
        }
        rig.outb(0x61, control);
        rig.inb(0x61);
        rig.clock.set_tick(u64::from(control) * 1000);
        rig.handle_timer();
    }

    let mut rng = Rng(0x0ddc_0ffe_e0dd_f00d);
    for _ in 0..100 {
        let rig = Rig::new(rng.next() >> 20);
        let mut now = rng.next() >> 24;
        for _ in 0..500 {
            let r = rng.next();
            let value = (r >> 8) as u8;
            let dev = if r & 0x100_0000 != 0 {
                &rig.ports.port_b
            } else {
                &rig.ports.counters
            };
            let offset = (r >> 32) % 5;
            let len = ((r >> 40) % 3) as usize;
            match r % 5 {
                0 | 1 => dev.lock().unwrap().write(offset, &[value, value][..len]),
                2 => dev.lock().unwrap().read(offset, &mut [0u8; 2][..len]),
                3 => {
                    now = now.saturating_add((r >> 44) % 100_000);
                    rig.clock.set_tick(now);
                    rig.handle_timer();
                }
                _ => {
                    let state = rig.pit.lock().unwrap().state();
                    rig.pit.lock().unwrap().set_state(&state).unwrap();
                }
            }
        }
    }
    // The far future.
    let rig = Rig::new(u64::MAX / 2);
    rig.program(0, 2, 0);
    rig.clock.0.store(u64::MAX, Ordering::SeqCst);
    rig.handle_timer();
    rig.latched_count(0);
}
