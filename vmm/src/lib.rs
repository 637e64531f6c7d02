//! The virtual machine monitor: turns a [`config::VmConfig`] into a running VM and drives it until the guest powers
//! off, resets (with `--no-reboot`), crashes, or the operator stops it.
//!
//! The pieces, each in its own module: [`config`] (what to run), [`memory`] (guest RAM), [`payload`] (kernel,
//! command line, initramfs), [`device_manager`] (platform devices on the buses), [`cpu`] (vCPU threads and the exit
//! dispatch), [`console`] (the serial console's host side), [`vm`] (the builder recipe and the control loop).

pub mod api;
mod api_handler;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod events;
pub mod firmware;
pub mod interrupts;
pub mod io;
pub mod legacy;
pub mod memory;
pub mod payload;
pub mod pci_segment;
pub mod virtio;
pub mod vm;

use crate::control::Vmm;

/// How a VM run ended without a VMM failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off through ACPI.
    PoweredOff,
    /// The guest reset and `--no-reboot` was given.
    ResetWithNoReboot,
    /// SIGINT or SIGTERM stopped the VM (or the console's quit sequence, reported as 0).
    Signalled(i32),
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u8),
}

/// Exit code: configuration or setup failure before the guest ran.
pub const EXIT_SETUP: i32 = 1;
/// Exit code: the guest triple-faulted.
pub const EXIT_TRIPLE_FAULT: i32 = 3;
/// Exit code: KVM could not run the guest (internal error, emulation failure).
pub const EXIT_GUEST_CRASH: i32 = 4;
/// Exit code: the VMM failed while the guest ran.
pub const EXIT_RUNTIME: i32 = 5;
/// Exit status when the firmware found nothing to boot (with `--firmware`).
pub const EXIT_NO_BOOTABLE_DEVICE: i32 = 6;

/// Why a VM run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM is missing or unusable.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    /// More vCPUs than KVM allows.
    #[error("--cpus: {requested} vCPUs requested but this host's KVM allows at most {limit}")]
    TooManyVcpus {
        /// Requested maximum.
        requested: u32,
        /// KVM's limit.
        limit: u32,
    },
    /// The serial console's host side.
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] vm::BuildError),
    /// The vCPU threads could not start.
    #[error(transparent)]
    Start(#[from] cpu::CpuError),
    /// The control loop failed.
    #[error("the control loop failed: {0}")]
    ControlLoop(#[source] std::io::Error),
    /// The API server.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// An operation needs a VM configuration first.
    #[error("no VM is configured; create one first")]
    NotCreated,
    /// The guest triple-faulted.
    #[error(
        "the guest triple-faulted on vCPU {vcpu} (a fatal CPU exception; see the registers above)"
    )]
    TripleFault {
        /// The vCPU.
        vcpu: u32,
    },
    /// KVM could not run the guest.
    #[error(
        "the firmware found no bootable disk and gave up after --boot-timeout={seconds} s; give a --disk with a boot \
         loader (and bootindex= to choose among several)"
    )]
    NoBootableDevice {
        /// The boot timeout the firmware waited.
        seconds: u32,
    },
    /// KVM could not run the guest.
    #[error("the guest crashed on vCPU {vcpu}: {reason}")]
    GuestCrash {
        /// The vCPU.
        vcpu: u32,
        /// What KVM reported.
        reason: String,
    },
    /// A vCPU thread failed.
    #[error("{0}")]
    Vcpu(String),
}

impl Error {
    /// The process exit code documented for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Hypervisor(_)
            | Error::TooManyVcpus { .. }
            | Error::Console(_)
            | Error::Build(_) => EXIT_SETUP,
            Error::TripleFault { .. } => EXIT_TRIPLE_FAULT,
            Error::NoBootableDevice { .. } => EXIT_NO_BOOTABLE_DEVICE,
            Error::GuestCrash { .. } => EXIT_GUEST_CRASH,
            Error::NotCreated | Error::Api(_) => EXIT_SETUP,
            Error::Start(_) | Error::ControlLoop(_) | Error::Vcpu(_) => EXIT_RUNTIME,
        }
    }
}

/// Builds the VM described by `config`, runs it, and returns how it ended. A guest reset rebuilds the VM in place
/// (keeping the console and the CMOS NVRAM) unless `no_reboot` is set.
pub fn run(config: config::VmConfig) -> Result<Outcome, Error> {
    // Before anything is opened: inherited tap descriptors.
    let net_fds = vm::claim_net_fds(&config)?;
    let mut vmm = Vmm::new()?;
    vmm.net_fds = net_fds;
    vmm.create(config)?;
    vmm.boot()?;
    vmm.run_loop(|_| control::Next::Continue)
}

/// Runs the VMM with a REST API on `socket`: boots `config` right away if given, otherwise waits for `vm.create` and
/// `vm.boot`. Returns when the guest powers off, a signal arrives, or `vmm.shutdown` is called.
pub fn run_with_api(
    config: Option<config::VmConfig>,
    socket: &std::path::Path,
) -> Result<Outcome, Error> {
    // Before anything is opened: inherited tap descriptors.
    let net_fds = match &config {
        Some(config) => vm::claim_net_fds(config)?,
        None => vm::NetFds::new(),
    };
    let mut vmm = Vmm::new()?;
    vmm.net_fds = net_fds;
    let (tx, rx) = std::sync::mpsc::channel();
    let notify = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
        .map_err(Error::ControlLoop)?;
    let wake = notify.try_clone().map_err(Error::ControlLoop)?;
    vmm.watch_api(std::os::fd::AsRawFd::as_raw_fd(&wake))?;
    let server = api::start_api_server(
        socket,
        api::ApiSender {
            requests: tx,
            notify,
        },
    )?;
    if let Some(config) = config {
        vmm.create(config)?;
        vmm.boot()?;
    }
    let result = vmm.run_loop(|vmm| {
        let _ = wake.read();
        api_handler::handle_api_requests(vmm, &rx)
    });
    server.shutdown();
    result
}
