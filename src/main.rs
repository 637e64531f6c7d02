//! `atrium`: boots one virtual machine from command-line options and exits with a status that says how it ended.

use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Parser, ValueEnum};
use vmm::config::{
    ConfigError, ConsoleOutputMode, CpusConfig, DiskConfig, FirmwareConfig, MemoryConfig,
    NetConfig, PayloadConfig, RngConfig, TripleFaultAction, VmConfig, VsockConfig,
    DEFAULT_BOOT_TIMEOUT,
};
use vmm::Outcome;

/// Exit code: the command line itself is malformed (clap's own errors).
const EXIT_USAGE: i32 = 2;

const EXIT_CODES: &str = "\
Exit codes:
  0    the guest powered off, reset with --no-reboot, or SIGINT/SIGTERM stopped the VM
  N    the guest wrote N to the debug-exit port (with --debug-exit)
  1    invalid configuration or setup failure before the guest ran (bad option, no /dev/kvm, bad kernel)
  2    command-line syntax error
  3    the guest triple-faulted (with --triple-fault crash)
  4    the guest crashed: KVM internal error or emulation failure
  5    the VMM failed while the guest ran
  6    the firmware found no bootable disk (with --firmware, after --boot-timeout)";

/// What happens when the guest triple-faults.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TripleFault {
    /// Stop and report a guest crash (exit code 3).
    Crash,
    /// Reset the VM, as real hardware does.
    Reboot,
}

#[derive(Debug, Parser)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Kernel image to boot: bzImage, ELF vmlinux or PVH ELF [default: the built-in demo guest]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initramfs to load for the kernel
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1" with --kernel, empty for the demo guest]
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,

    /// vCPUs at boot and at most (max defaults to boot) [default: boot=1]
    #[arg(long, value_name = "boot=N[,max=M]")]
    cpus: Option<String>,

    /// Guest RAM: bytes or K, M, G, T (binary units) [default: size=512M]
    #[arg(long, value_name = "size=SIZE")]
    memory: Option<String>,

    /// Serial console (COM1): tty, file=PATH, socket=PATH, null or off [default: tty]
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,

    /// Add the debug-exit port 0xf4: the guest writing byte N ends atrium with exit status N
    #[arg(long)]
    debug_exit: bool,

    /// Exit (status 0) when the guest resets instead of rebooting it
    #[arg(long)]
    no_reboot: bool,

    /// What a guest triple fault does
    #[arg(long, value_enum, value_name = "ACTION", default_value_t = TripleFault::Crash)]
    triple_fault: TripleFault,

    /// A virtio block device on a raw or qcow2 image (repeat for more disks)
    #[arg(
        long,
        value_name = "path=PATH[,format=raw|qcow2][,readonly=on][,num_queues=N][,queue_size=N][,serial=ID][,id=NAME]"
    )]
    disk: Vec<String>,
    /// A virtio-net device on a tap interface (tap= empty: Atrium creates one and removes it at exit)
    #[arg(
        long,
        value_name = "tap=NAME[,mac=MAC][,num_queues=N][,queue_size=N][,id=NAME]"
    )]
    net: Vec<String>,
    /// The virtio console (hvc0): off, null, tty, file=PATH or socket=PATH [default: off]
    #[arg(long, value_name = "MODE")]
    console: Option<String>,
    /// A virtio-vsock device: guest port N connects to SOCKET_N; host programs connect to SOCKET and write "CONNECT N\n"
    #[arg(long, value_name = "cid=N,socket=PATH[,id=NAME]")]
    vsock: Option<String>,
    /// A virtio entropy device (bytes from getrandom, or from src=PATH)
    #[arg(long, value_name = "src=PATH", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
    /// Boot this firmware (e.g. SeaBIOS's bios-256k.bin) instead of a kernel; it boots from the disks
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// With --firmware: seconds the firmware looks for a bootable disk before atrium gives up [default: 10]
    #[arg(long, value_name = "SECONDS", requires = "firmware")]
    boot_timeout: Option<u32>,
    /// Firmware debug console on port 0x402: off, null, tty, file=PATH or socket=PATH [default: off]
    #[arg(long, value_name = "MODE")]
    debug_console: Option<String>,
    /// Serve the REST API on this Unix socket; without --kernel, wait for vm.create and vm.boot
    #[arg(long, value_name = "path=PATH")]
    api_socket: Option<String>,
    /// Log more (repeat for more detail)
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

impl Cli {
    /// The VM configuration these options describe (option strings parsed, not yet validated against the host).
    fn into_config(self) -> Result<VmConfig, ConfigError> {
        let cpus = match &self.cpus {
            Some(s) => CpusConfig::parse(s)?,
            None => CpusConfig::default(),
        };
        let memory = match &self.memory {
            Some(s) => MemoryConfig::parse(s)?,
            None => MemoryConfig::default(),
        };
        let serial = match &self.serial {
            Some(s) => ConsoleOutputMode::parse(s)?,
            None => ConsoleOutputMode::default(),
        };
        Ok(VmConfig {
            cpus,
            memory,
            payload: PayloadConfig::new(self.kernel, self.initramfs, self.cmdline),
            serial,
            debug_exit: self.debug_exit,
            no_reboot: self.no_reboot,
            triple_fault: match self.triple_fault {
                TripleFault::Crash => TripleFaultAction::Crash,
                TripleFault::Reboot => TripleFaultAction::Reboot,
            },
            verbosity: self.verbose,
            disks: self
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_, _>>()?,
            rng: self.rng.as_deref().map(RngConfig::parse).transpose()?,
            firmware: self.firmware.map(|path| FirmwareConfig {
                path,
                boot_timeout: self.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
            }),
            debug_console: match self.debug_console.as_deref() {
                None | Some("off") => None,
                Some(s) => Some(ConsoleOutputMode::parse(s)?),
            },
            vsock: self.vsock.as_deref().map(VsockConfig::parse).transpose()?,
            nets: self
                .net
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_, _>>()?,
            console: match self.console.as_deref() {
                None | Some("off") => None,
                Some(mode) => Some(ConsoleOutputMode::parse(mode)?),
            },
        })
    }
}

/// Parses the command line. Help and version go to stdout with status 0; a syntax error becomes one line.
fn parse_cli() -> Result<Cli, (String, i32)> {
    Cli::try_parse().map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Printing can only fail if stdout is closed; there is nothing left to report then.
            let _ = e.print();
            (String::new(), 0)
        }
        _ => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            let message = first.strip_prefix("error: ").unwrap_or(first);
            let hint = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(values)) => {
                    format!("possible values: {}", values.join(", "))
                }
                _ => "see 'atrium --help'".to_string(),
            };
            (format!("{message} ({hint})"), EXIT_USAGE)
        }
    })
}

/// Sends log events to stderr: errors only by default, one more level per `-v`.
fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => tracing::Level::ERROR,
        1 => tracing::Level::WARN,
        2 => tracing::Level::INFO,
        3 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    // Fails only if a subscriber is already installed, which leaves logging as it was.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Runs atrium and returns the process exit status, having printed the one-line error if there was one.
fn run() -> i32 {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err((message, code)) => {
            if !message.is_empty() {
                eprintln!("atrium: {message}");
            }
            return code;
        }
    };
    let api_socket = cli
        .api_socket
        .clone()
        .map(|s| PathBuf::from(s.strip_prefix("path=").unwrap_or(&s)));
    // With an API socket and no kernel, the VM comes later through the API.
    let wants_vm = api_socket.is_none() || cli.kernel.is_some() || cli.firmware.is_some();
    init_logging(cli.verbose);
    let config = match cli.into_config().and_then(|c| c.validate().map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("atrium: {e}");
            return vmm::EXIT_SETUP;
        }
    };
    let result = match &api_socket {
        Some(socket) => vmm::run_with_api(wants_vm.then_some(config), socket),
        None => vmm::run(config),
    };
    match result {
        Ok(Outcome::PoweredOff | Outcome::ResetWithNoReboot | Outcome::Signalled(_)) => 0,
        Ok(Outcome::DebugExit(code)) => i32::from(code),
        Err(e) => {
            eprintln!("atrium: {e}");
            e.exit_code()
        }
    }
}

fn main() {
    std::process::exit(run());
}
