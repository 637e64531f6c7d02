//! One boot of a VM: the builder recipe that assembles it, and the control loop that runs it until it stops.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Once};

use arch::BootSetup;
use epoll::{ControlOptions, Event, Events};
use hypervisor::{Hypervisor, Vcpu};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DiskImageFormat, TripleFaultAction, VmConfig};
use crate::console::{Console, ConsoleInput};
use crate::cpu::{self, BootEntry, CpuError, VcpuContext, VcpuHandle};
use crate::device_manager::{DeviceError, DeviceManager, DeviceSetup, IOAPIC_PINS};
use crate::events::{StopReason, VmEvents};
use crate::io::IoDispatch;
use crate::memory::{MemoryError, MemoryManager};
use crate::payload::{self, PayloadError};

/// Where KVM may put the three-page real-mode TSS that VMX needs (inside the 32-bit MMIO gap, unused by devices).
const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Where KVM may put the identity-map page VMX needs (just below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors while building a VM; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Creating the KVM VM or its interrupt controllers failed.
    #[error("cannot create the VM: {0}")]
    CreateVm(#[source] hypervisor::HypervisorError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, command line or initramfs.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The event channel.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// MP or ACPI tables, or the zero page.
    #[error("cannot write the boot tables: {0}")]
    BootTables(String),
    /// vCPUs.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A disk image.
    #[error("{0}")]
    Disk(String),
    /// The entropy source.
    #[error("{0}")]
    Rng(String),
}

/// How a boot ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest or a vCPU stopped the VM.
    Stopped(StopReason),
    /// SIGINT/SIGTERM arrived.
    Signal(i32),
    /// The operator typed the console's quit sequence.
    ConsoleQuit,
}

/// Failures of the control loop itself.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// epoll failed.
    #[error("the control loop failed: {0}")]
    Epoll(#[source] std::io::Error),
}

/// A built VM. Fields drop in order: vCPU threads are joined before devices, the KVM VM and guest memory go away.
pub struct Vm {
    vcpu_threads: Vec<VcpuHandle>,
    pending_vcpus: Vec<(u32, Box<dyn Vcpu>)>,
    devices: DeviceManager,
    events: Arc<VmEvents>,
    context: Arc<VcpuContext>,
    _vm: Arc<dyn hypervisor::Vm>,
    _memory: MemoryManager,
}

impl Vm {
    /// Builds a VM from `config`, ready to start. The recipe, in order: VM and interrupt controllers, guest memory,
    /// payload, platform devices, virtio devices on PCI, platform tables, boot parameters, vCPUs (created, not yet
    /// running).
    pub fn build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        console: &Console,
        cmos_state: Option<devices::cmos::CmosState>,
    ) -> Result<Vm, BuildError> {
        // 1. The VM, with KVM's local APICs and a user-space IOAPIC (split irqchip).
        let vm = hv.create_vm().map_err(BuildError::CreateVm)?;
        vm.setup_x86_platform(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS)
            .map_err(BuildError::CreateVm)?;
        vm.create_split_irqchip(IOAPIC_PINS)
            .map_err(BuildError::CreateVm)?;

        // 2. Guest RAM.
        let memory = MemoryManager::new(&vm, config.memory.size)?;
        let mem = memory.guest_memory();

        // 3. Kernel, command line, initramfs.
        let loaded = payload::load(mem, &config.payload, guests::DEMO)?;

        // 4. Devices.
        let events = Arc::new(VmEvents::new().map_err(BuildError::EventFd)?);
        let ram = memory.ram_size();
        let below_4g = ram.min(arch::layout::MEM_32BIT_GAP_START);
        let devices = DeviceManager::new(
            &vm,
            events.clone(),
            DeviceSetup {
                serial_out: console.enabled().then(|| console.writer()),
                mem_below_4g: below_4g,
                mem_above_4g: ram - below_4g,
                cmos_state,
                debug_exit: config.debug_exit,
            },
        )?;

        // 5. Virtio devices on PCI: disks first (in the order given), then the entropy device.
        let mut devices = devices;
        let guest_mem = virtio_devices::GuestMemory::new(mem.clone());
        for (index, disk) in config.disks.iter().enumerate() {
            let name = disk.id.clone().unwrap_or_else(|| format!("disk{index}"));
            let disk_err =
                |e: String| BuildError::Disk(format!("--disk path={}: {e}", disk.path.display()));
            let format = match disk.format {
                Some(DiskImageFormat::Raw) => virtio_devices::DiskFormat::Raw,
                Some(DiskImageFormat::Qcow2) => virtio_devices::DiskFormat::Qcow2,
                None => detect_disk_format(&disk.path).map_err(|e| disk_err(e.to_string()))?,
            };
            let backend = virtio_devices::open_disk(&disk.path, format, disk.readonly)
                .map_err(|e| disk_err(e.to_string()))?;
            let options = virtio_devices::BlockOptions {
                serial: disk.serial.clone().unwrap_or_default(),
                num_queues: disk.num_queues,
                queue_size: disk.queue_size,
            };
            let block = virtio_devices::Block::new(backend, &options)
                .map_err(|e| disk_err(e.to_string()))?;
            devices.add_virtio(name, &guest_mem, Box::new(block))?;
        }
        if let Some(rng) = &config.rng {
            let source = if rng.src.as_os_str() == "/dev/urandom" {
                virtio_devices::RngSource::Getrandom
            } else {
                virtio_devices::RngSource::File(rng.src.clone())
            };
            let device = virtio_devices::Rng::new(&source)
                .map_err(|e| BuildError::Rng(format!("--rng src={}: {e}", rng.src.display())))?;
            devices.add_virtio("rng0".to_string(), &guest_mem, Box::new(device))?;
        }

        // 6. Platform tables the guest discovers CPUs and interrupts from.
        let boot_cpus = config.cpus.boot_vcpus;
        let max_cpus = config.cpus.max_vcpus;
        match arch::mptable::setup_mptable(mem, boot_cpus) {
            Ok(()) => {}
            // The legacy MP table has room for a few dozen CPUs; larger guests find them through ACPI alone.
            Err(e @ arch::mptable::Error::TooManyCpus { .. }) => {
                tracing::warn!("no MP table: {e}");
            }
            Err(e) => return Err(BuildError::BootTables(e.to_string())),
        }
        let rsdp = arch::acpi::create_acpi_tables(mem, boot_cpus, max_cpus, ram)
            .map_err(|e| BuildError::BootTables(e.to_string()))?;

        // 7. Boot parameters (zero page or PVH start info).
        arch::configure_system(
            mem,
            &BootSetup {
                protocol: loaded.protocol,
                cmdline_addr: loaded.cmdline.0,
                cmdline_size: loaded.cmdline.1,
                initramfs: loaded.initramfs,
                setup_header: loaded.setup_header,
                rsdp_addr: Some(rsdp),
                ram_size: ram,
            },
        )
        .map_err(|e| BuildError::BootTables(e.to_string()))?;

        // 8. vCPUs: the boot vCPU at the entry point, the others waiting for the guest's INIT/SIPI.
        let base_cpuid = hv.supported_cpuid().map_err(BuildError::CreateVm)?;
        let boot = BootEntry {
            entry: loaded.entry,
            protocol: loaded.protocol,
        };
        let mut pending_vcpus = Vec::new();
        for id in 0..boot_cpus {
            let vcpu = cpu::create_vcpu(
                &vm,
                id,
                max_cpus,
                &base_cpuid,
                mem,
                (id == 0).then_some(&boot),
            )?;
            pending_vcpus.push((id, vcpu));
        }

        let io = Arc::new(IoDispatch::new(
            devices.io_bus().clone(),
            devices.mmio_bus().clone(),
        ));
        let context = Arc::new(VcpuContext {
            io,
            events: events.clone(),
            ioapic: devices.ioapic().clone(),
            triple_fault_resets: config.triple_fault == TripleFaultAction::Reboot,
        });
        Ok(Vm {
            vcpu_threads: Vec::new(),
            pending_vcpus,
            devices,
            events,
            context,
            _vm: vm,
            _memory: memory,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), CpuError> {
        for (id, vcpu) in self.pending_vcpus.drain(..) {
            self.vcpu_threads
                .push(cpu::spawn_vcpu(id, vcpu, self.context.clone())?);
        }
        Ok(())
    }

    /// The CMOS state, to carry across a guest reboot.
    pub fn cmos_state(&self) -> devices::cmos::CmosState {
        self.devices.cmos_state()
    }

    /// Accesses no device claimed so far: (port, MMIO).
    pub fn unclaimed_accesses(&self) -> (u64, u64) {
        let u = &self.context.io.unclaimed;
        (
            u.pio.load(Ordering::Relaxed),
            u.mmio.load(Ordering::Relaxed),
        )
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        for handle in self.vcpu_threads.drain(..) {
            handle.finish();
        }
    }

    /// The control loop: waits for a stop reason, a signal, or console input, until the VM stops.
    pub fn run(&mut self, console: &mut Console) -> Result<RunEnd, RunError> {
        let epoll = Epoll::new().map_err(RunError::Epoll)?;
        const TOKEN_EVENTS: u64 = u64::MAX;
        const TOKEN_SIGNAL: u64 = u64::MAX - 1;
        epoll
            .add(self.events.eventfd().as_raw_fd(), TOKEN_EVENTS)
            .map_err(RunError::Epoll)?;
        epoll
            .add(signal_eventfd().as_raw_fd(), TOKEN_SIGNAL)
            .map_err(RunError::Epoll)?;
        if self.devices.serial().is_some() {
            for fd in console.input_fds() {
                // stdin may be something epoll can't watch (a regular file, /dev/null): then it gives no input.
                let _ = epoll.add(fd, fd as u64);
            }
        }
        let mut client: Option<RawFd> = None;

        let end = loop {
            if let Some(reason) = self.events.reason() {
                break RunEnd::Stopped(reason);
            }
            let mut ready = [Event::new(Events::empty(), 0); 8];
            let n = match epoll.wait(&mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Epoll(e)),
            };
            let mut finished = None;
            for event in &ready[..n] {
                let token = event.data;
                match token {
                    TOKEN_EVENTS => {
                        let _ = self.events.eventfd().read();
                    }
                    TOKEN_SIGNAL => {
                        let _ = signal_eventfd().read();
                        finished = Some(RunEnd::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
                    }
                    fd => {
                        let fd = fd as RawFd;
                        match console.handle_readable(fd) {
                            ConsoleInput::Bytes(bytes) => self.feed_serial(&bytes),
                            ConsoleInput::Quit => finished = Some(RunEnd::ConsoleQuit),
                            ConsoleInput::Closed => {
                                let _ = epoll.delete(fd);
                                if client == Some(fd) {
                                    client = None;
                                }
                            }
                            ConsoleInput::Nothing => {}
                        }
                        let now = console.client_fd();
                        if now != client {
                            if let Some(old) = client {
                                let _ = epoll.delete(old);
                            }
                            if let Some(new) = now {
                                let _ = epoll.add(new, new as u64);
                            }
                            client = now;
                        }
                    }
                }
            }
            if let Some(end) = finished {
                break end;
            }
        };
        self.shutdown();
        Ok(end)
    }

    fn feed_serial(&self, bytes: &[u8]) {
        if let Some(serial) = self.devices.serial() {
            let mut serial = serial.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = serial.enqueue_input(bytes) {
                tracing::debug!("serial input dropped: {e}");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The format of a disk image given without `format=`: qcow2 if it starts with the qcow2 magic, raw otherwise.
fn detect_disk_format(path: &std::path::Path) -> std::io::Result<virtio_devices::DiskFormat> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        virtio_devices::DiskFormat::Qcow2
    } else {
        virtio_devices::DiskFormat::Raw
    })
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
            std::process::exit(5)
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
pub fn install_stop_signals() {
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
