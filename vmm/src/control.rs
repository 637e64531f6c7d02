//! The VMM's control loop: one epoll loop that waits for the guest's stop reasons, SIGINT/SIGTERM, serial console
//! input and (with `--api-socket`) API requests, and drives the VM through its life: created, running, paused, and
//! rebooted in place or ended.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Once};

use epoll::{ControlOptions, Event, Events};
use hypervisor::KvmHypervisor;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::console::{Console, ConsoleInput};
use crate::events::{StopReason, VmEvents};
use crate::vm::Vm;
use crate::{Error, Outcome};

const TOKEN_VM_EVENTS: u64 = u64::MAX;
const TOKEN_SIGNAL: u64 = u64::MAX - 1;
const TOKEN_API: u64 = u64::MAX - 2;
const TOKEN_EJECT: u64 = u64::MAX - 3;
const TOKEN_LEGACY_TIMER: u64 = u64::MAX - 4;
/// Console fds are their own tokens; the virtio console's carry this bit.
const VIRTIO_CONSOLE_TOKEN: u64 = 1 << 32;

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// No configuration yet (API mode).
    NotCreated,
    /// Configured, not booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

impl VmState {
    /// The name the API reports.
    pub fn name(self) -> &'static str {
        match self {
            VmState::NotCreated => "NotCreated",
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// What the loop does next.
pub(crate) enum Next {
    /// Keep looping.
    Continue,
    /// End the process with this outcome.
    Exit(Result<Outcome, Error>),
}

/// The VMM: hypervisor, configuration, the VM when there is one, and the loop's descriptors.
pub struct Vmm {
    pub(crate) hv: KvmHypervisor,
    pub(crate) config: Option<VmConfig>,
    pub(crate) vm: Option<Vm>,
    pub(crate) state: VmState,
    pub(crate) console: Option<Console>,
    /// The virtio console's host side.
    vconsole: Option<Console>,
    pub(crate) events: Arc<VmEvents>,
    /// Signalled when the guest ejects a hot-removed CPU or device.
    eject_event: EventFd,
    /// Tap descriptors inherited from the parent (`--net fd=`).
    pub(crate) net_fds: crate::vm::NetFds,
    cmos_state: Option<devices::cmos::CmosState>,
    epoll: Epoll,
    /// Console fds registered with epoll.
    console_fds: Vec<RawFd>,
    client_fd: Option<RawFd>,
}

impl Vmm {
    /// Opens KVM and the loop's descriptors.
    pub fn new() -> Result<Self, Error> {
        let hv = KvmHypervisor::new()?;
        let events = Arc::new(VmEvents::new().map_err(Error::ControlLoop)?);
        let epoll = Epoll::new().map_err(Error::ControlLoop)?;
        epoll
            .add(events.eventfd().as_raw_fd(), TOKEN_VM_EVENTS)
            .map_err(Error::ControlLoop)?;
        let eject_event = EventFd::new(EFD_NONBLOCK).map_err(Error::ControlLoop)?;
        epoll
            .add(eject_event.as_raw_fd(), TOKEN_EJECT)
            .map_err(Error::ControlLoop)?;
        install_stop_signals();
        epoll
            .add(signal_eventfd().as_raw_fd(), TOKEN_SIGNAL)
            .map_err(Error::ControlLoop)?;
        Ok(Vmm {
            hv,
            config: None,
            vm: None,
            state: VmState::NotCreated,
            console: None,
            vconsole: None,
            events,
            eject_event,
            net_fds: crate::vm::NetFds::new(),
            cmos_state: None,
            epoll,
            console_fds: Vec::new(),
            client_fd: None,
        })
    }

    /// Watches `fd` for API requests.
    pub fn watch_api(&self, fd: RawFd) -> Result<(), Error> {
        self.epoll.add(fd, TOKEN_API).map_err(Error::ControlLoop)
    }

    /// Takes a configuration (checks what needs KVM: the vCPU limit) and opens the console's host side.
    pub fn create(&mut self, config: VmConfig) -> Result<(), Error> {
        let limit = hypervisor::Hypervisor::max_vcpus(&self.hv);
        if config.cpus.max_vcpus > limit {
            return Err(Error::TooManyVcpus {
                requested: config.cpus.max_vcpus,
                limit,
            });
        }
        let console = Console::new(&config.serial)?;
        for fd in console.input_fds() {
            // stdin may be something epoll can't watch (a regular file, /dev/null): then it gives no input.
            if self.epoll.add(fd, fd as u64).is_ok() {
                self.console_fds.push(fd);
            }
        }
        self.console = Some(console);
        if let Some(mode) = &config.console {
            let vconsole = Console::new(mode)?;
            for fd in vconsole.input_fds() {
                let _ = self.epoll.add(fd, fd as u64 | VIRTIO_CONSOLE_TOKEN);
            }
            self.vconsole = Some(vconsole);
        }
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(())
    }

    /// Builds the VM from the configuration and starts its vCPUs.
    pub fn boot(&mut self) -> Result<(), Error> {
        let (Some(config), Some(console)) = (&self.config, &self.console) else {
            return Err(Error::NotCreated);
        };
        let mut vm = Vm::build(
            &self.hv,
            config,
            console,
            self.cmos_state.take(),
            self.events.clone(),
            &crate::vm::HostResources {
                eject_event: &self.eject_event,
                vconsole: self.vconsole.as_ref(),
                net_fds: &self.net_fds,
            },
        )?;
        if let Some(legacy) = vm.devices().legacy() {
            // A closed descriptor leaves epoll by itself, so the previous boot's timer needs no removal.
            self.epoll
                .add(legacy.timer_fd(), TOKEN_LEGACY_TIMER)
                .map_err(Error::ControlLoop)?;
        }
        vm.start()?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    /// Pauses the vCPUs.
    pub fn pause(&mut self) -> bool {
        match (&self.vm, self.state) {
            (Some(vm), VmState::Running) => {
                vm.pause();
                self.state = VmState::Paused;
                true
            }
            _ => false,
        }
    }

    /// Resumes the vCPUs.
    pub fn resume(&mut self) -> bool {
        match (&self.vm, self.state) {
            (Some(vm), VmState::Paused) => {
                vm.resume();
                self.state = VmState::Running;
                true
            }
            _ => false,
        }
    }

    /// Stops the VM (joins its vCPUs and drops it), keeping the configuration.
    pub fn stop_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            self.cmos_state = Some(vm.cmos_state());
            vm.shutdown();
            let (pio, mmio) = vm.unclaimed_accesses();
            if pio + mmio > 0 {
                tracing::debug!("unclaimed accesses: {pio} port, {mmio} MMIO");
            }
        }
        let _ = self.events.take_reason();
        if self.config.is_some() {
            self.state = VmState::Created;
        }
    }

    /// Reboots in place: stop, rebuild, start.
    pub fn reboot(&mut self) -> Result<(), Error> {
        self.stop_vm();
        self.boot()
    }

    /// Runs the loop until the VMM should exit. `api` handles requests when the API fd is readable.
    pub(crate) fn run_loop(
        &mut self,
        mut api: impl FnMut(&mut Vmm) -> Next,
    ) -> Result<Outcome, Error> {
        loop {
            let mut ready = [Event::new(Events::empty(), 0); 16];
            let n = match self.epoll.wait(&mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::ControlLoop(e)),
            };
            for event in &ready[..n] {
                let token = event.data;
                let next = match token {
                    TOKEN_VM_EVENTS => self.handle_stop(),
                    TOKEN_SIGNAL => {
                        let _ = signal_eventfd().read();
                        self.stop_vm();
                        Next::Exit(Ok(Outcome::Signalled(LAST_SIGNAL.load(Ordering::SeqCst))))
                    }
                    TOKEN_API => api(self),
                    TOKEN_EJECT => self.handle_ejects(),
                    TOKEN_LEGACY_TIMER => {
                        if let Some(legacy) = self.vm.as_ref().and_then(|vm| vm.devices().legacy())
                        {
                            legacy.handle_timer();
                        }
                        Next::Continue
                    }
                    token if token & VIRTIO_CONSOLE_TOKEN != 0 => {
                        self.handle_virtio_console((token & 0xffff_ffff) as RawFd)
                    }
                    fd => self.handle_console(fd as RawFd),
                };
                if let Next::Exit(result) = next {
                    self.stop_vm();
                    return result;
                }
            }
        }
    }

    /// The guest (or a vCPU) stopped the VM: reboot in place, or end.
    fn handle_stop(&mut self) -> Next {
        let Some(reason) = self.events.reason() else {
            let _ = self.events.eventfd().read();
            return Next::Continue;
        };
        let no_reboot = self.config.as_ref().is_some_and(|c| c.no_reboot);
        let exit = match reason {
            StopReason::PowerOff => Ok(Outcome::PoweredOff),
            StopReason::DebugExit(code) => Ok(Outcome::DebugExit(code)),
            StopReason::Reset
                if self
                    .vm
                    .as_ref()
                    .is_some_and(Vm::firmware_found_nothing_to_boot) =>
            {
                let seconds = self
                    .config
                    .as_ref()
                    .and_then(|c| c.firmware.as_ref())
                    .map_or(0, |f| f.boot_timeout);
                Err(Error::NoBootableDevice { seconds })
            }
            StopReason::Reset if no_reboot => Ok(Outcome::ResetWithNoReboot),
            StopReason::Reset => {
                tracing::info!("guest reset: rebooting");
                return match self.reboot() {
                    Ok(()) => Next::Continue,
                    Err(e) => Next::Exit(Err(e)),
                };
            }
            StopReason::TripleFault { vcpu, registers } => {
                eprintln!("{registers}");
                Err(Error::TripleFault { vcpu })
            }
            StopReason::GuestCrash {
                vcpu,
                reason,
                registers,
            } => {
                eprintln!("{registers}");
                Err(Error::GuestCrash { vcpu, reason })
            }
            StopReason::VcpuError(message) => Err(Error::Vcpu(message)),
        };
        Next::Exit(exit)
    }

    /// The guest released hot-removed CPUs or devices: take them away.
    fn handle_ejects(&mut self) -> Next {
        let _ = self.eject_event.read();
        if let Some(vm) = self.vm.as_mut() {
            for id in vm.devices().take_ejected_cpus() {
                vm.unplug_vcpu(id);
                tracing::info!("vCPU {id} removed");
            }
            for name in vm.devices_mut().collect_ejected_devices() {
                tracing::info!("device {name} removed");
            }
        }
        Next::Continue
    }

    fn handle_virtio_console(&mut self, fd: RawFd) -> Next {
        let Some(console) = self.vconsole.as_mut() else {
            return Next::Continue;
        };
        match console.handle_readable(fd) {
            ConsoleInput::Bytes(bytes) => {
                if let Some(vm) = &self.vm {
                    vm.feed_virtio_console(&bytes);
                }
            }
            ConsoleInput::Quit => return Next::Exit(Ok(Outcome::Signalled(0))),
            ConsoleInput::Closed => {
                let _ = self.epoll.delete(fd);
            }
            ConsoleInput::Nothing => {}
        }
        // A socket client that connected: watch it too.
        if let Some(client) = console.client_fd() {
            let _ = self.epoll.add(client, client as u64 | VIRTIO_CONSOLE_TOKEN);
        }
        Next::Continue
    }

    fn handle_console(&mut self, fd: RawFd) -> Next {
        let Some(console) = self.console.as_mut() else {
            return Next::Continue;
        };
        let input = console.handle_readable(fd);
        let now = console.client_fd();
        match input {
            ConsoleInput::Bytes(bytes) => {
                if let Some(vm) = &self.vm {
                    vm.feed_serial(&bytes);
                }
            }
            ConsoleInput::Quit => return Next::Exit(Ok(Outcome::Signalled(0))),
            ConsoleInput::Closed => {
                let _ = self.epoll.delete(fd);
                self.console_fds.retain(|&f| f != fd);
                if self.client_fd == Some(fd) {
                    self.client_fd = None;
                }
            }
            ConsoleInput::Nothing => {}
        }
        if now != self.client_fd {
            if let Some(old) = self.client_fd {
                let _ = self.epoll.delete(old);
            }
            if let Some(new) = now {
                let _ = self.epoll.add(new, new as u64);
            }
            self.client_fd = now;
        }
        Next::Continue
    }
}

/// A small owner of an epoll descriptor.
struct Epoll(RawFd);

impl Epoll {
    fn new() -> std::io::Result<Self> {
        epoll::create(true).map(Epoll)
    }

    fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_ADD,
            fd,
            Event::new(Events::EPOLLIN, token),
        )
    }

    fn delete(&self, fd: RawFd) -> std::io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_DEL,
            fd,
            Event::new(Events::empty(), 0),
        )
    }

    fn wait(&self, events: &mut [Event]) -> std::io::Result<usize> {
        epoll::wait(self.0, -1, events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}

/// The last SIGINT/SIGTERM received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The eventfd the signal handler writes to.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

fn signal_eventfd() -> &'static EventFd {
    static EVT: std::sync::OnceLock<EventFd> = std::sync::OnceLock::new();
    EVT.get_or_init(|| match EventFd::new(EFD_NONBLOCK) {
        Ok(evt) => evt,
        // Without an eventfd the VMM cannot be stopped by signals; there is no sensible way on.
        Err(e) => {
            eprintln!("atrium: cannot create an eventfd: {e}");
            std::process::exit(crate::EXIT_RUNTIME)
        }
    })
}

extern "C" fn stop_signal_handler(
    signum: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    LAST_SIGNAL.store(signum, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write() is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is the signal eventfd, which
        // lives for the whole process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes SIGINT and SIGTERM into the control loop (once per process).
fn install_stop_signals() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        SIGNAL_FD.store(signal_eventfd().as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, stop_signal_handler)
            {
                tracing::error!("cannot handle signal {sig}: {e}");
            }
        }
    });
}
