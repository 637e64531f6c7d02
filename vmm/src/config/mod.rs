//! What to run: the VM configuration types and the parsers for the command line's `key=value,...` option strings.
//!
//! Parsing checks syntax and the rules that need nothing but the value itself; [`VmConfig::validate`] checks the
//! whole configuration again, including what depends on the host (its memory, the files named), so a configuration
//! that arrives by another route (for example as JSON) gets the same checks.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The most vCPUs a VM may have: xAPIC IDs are 8 bits and 255 is the broadcast ID.
pub const MAX_VCPUS: u32 = 255;
/// The least guest memory accepted: boot structures, the kernel and its early allocations need this much.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;
/// Guest memory is mapped in whole pages of this size.
pub const MEMORY_ALIGNMENT: u64 = 4 << 10;
/// Guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// The kernel command line used for a user kernel when `--cmdline` is not given.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const CPUS_OPTION: &str = "--cpus";
const CPUS_KEYS: &[&str] = &["boot", "max"];
const MEMORY_OPTION: &str = "--memory";
const MEMORY_KEYS: &[&str] = &["size", "hotplug_method", "hotplug_size"];
/// Hot-added memory comes in multiples of this (Linux's memory block size on x86_64).
pub const MEMORY_HOTPLUG_ALIGNMENT: u64 = 128 << 20;
const SERIAL_MODES: &str = "tty, file=PATH, socket=PATH, null, off";

/// A configuration that cannot be used. Each message is one line naming the option, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An option string was empty or had an empty entry between commas.
    #[error("{option}: empty entry in '{input}'; give comma-separated key=value pairs (valid keys: {})", valid.join(", "))]
    EmptyEntry {
        /// The command-line option.
        option: &'static str,
        /// The whole option string.
        input: String,
        /// The keys the option accepts.
        valid: &'static [&'static str],
    },
    /// An entry had no `=`.
    #[error("{option}: '{entry}' is not key=value (valid keys: {})", valid.join(", "))]
    MissingEquals {
        /// The command-line option.
        option: &'static str,
        /// The entry without `=`.
        entry: String,
        /// The keys the option accepts.
        valid: &'static [&'static str],
    },
    /// A key the option does not know.
    #[error("{option}: unknown key '{key}' (valid keys: {})", valid.join(", "))]
    UnknownKey {
        /// The command-line option.
        option: &'static str,
        /// The unknown key.
        key: String,
        /// The keys the option accepts.
        valid: &'static [&'static str],
    },
    /// A key given more than once.
    #[error("{option}: key '{key}' is given more than once; give it once")]
    DuplicateKey {
        /// The command-line option.
        option: &'static str,
        /// The repeated key.
        key: String,
    },
    /// A key with nothing after `=`.
    #[error("{option}: key '{key}' has an empty value; write {key}=VALUE")]
    EmptyValue {
        /// The command-line option.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// A value that should be a whole number.
    #[error("{option} {key}={value}: '{value}' is not a whole number; use decimal digits")]
    InvalidNumber {
        /// The command-line option.
        option: &'static str,
        /// The key.
        key: String,
        /// The text given.
        value: String,
    },
    /// A number too large for its field.
    #[error("{option} {key}={value}: the number is too large (at most {max})")]
    NumberTooLarge {
        /// The command-line option.
        option: &'static str,
        /// The key.
        key: String,
        /// The text given.
        value: String,
        /// The largest value the field holds.
        max: u64,
    },
    /// A key an option cannot do without.
    #[error("{option}: '{key}=' is required")]
    MissingKey {
        /// The command-line option.
        option: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A value outside what the key accepts.
    #[error("{option} {key}={value}: {expected}")]
    InvalidValue {
        /// The command-line option.
        option: &'static str,
        /// The key.
        key: &'static str,
        /// The text given.
        value: String,
        /// What is accepted instead.
        expected: &'static str,
    },
    /// The serial port and the virtio console both want the terminal.
    #[error("--serial tty and --console tty cannot share the terminal; use --serial null (or off) with --console tty")]
    TwoTtyConsoles,
    /// Both a firmware and a kernel were given.
    #[error("--firmware and --kernel both given; boot either firmware (which loads the boot loader from a disk) or a kernel directly")]
    FirmwareWithKernel,
    /// The firmware wait for a bootable disk is zero.
    #[error("--boot-timeout=0: give the firmware at least 1 second to find a bootable disk")]
    ZeroBootTimeout,
    /// Two devices share an id.
    #[error("device id '{id}' is used twice; give each device its own id=")]
    DuplicateDeviceId {
        /// The id.
        id: String,
    },
    /// A file a device needs cannot be used.
    #[error("{option} {key}={path}: {reason}")]
    DeviceFile {
        /// The command-line option.
        option: &'static str,
        /// The key naming the file.
        key: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A memory size that does not parse.
    #[error("--memory size={value}: '{value}' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)")]
    InvalidSize {
        /// The text given.
        value: String,
    },
    /// A memory size that does not fit in 64 bits.
    #[error("--memory size={value}: the size is too large to represent; use a smaller size")]
    SizeOverflow {
        /// The text given.
        value: String,
    },
    /// Zero vCPUs.
    #[error("--cpus boot=0: the VM needs at least one vCPU; use boot=1 or more")]
    NoVcpus,
    /// More boot vCPUs than the maximum.
    #[error("--cpus: boot={boot} is more than max={max}; raise max or lower boot")]
    BootAboveMax {
        /// Boot vCPUs.
        boot: u32,
        /// Maximum vCPUs.
        max: u32,
    },
    /// More vCPUs than xAPIC IDs allow.
    #[error("--cpus: {requested} vCPUs requested but at most {MAX_VCPUS} are supported (xAPIC IDs); lower boot/max")]
    TooManyVcpus {
        /// The requested maximum.
        requested: u32,
    },
    /// Less memory than the guest needs to boot.
    #[error("--memory size={size}: the guest needs at least 16 MiB")]
    MemoryTooSmall {
        /// The requested size.
        size: Size,
    },
    /// Memory that is not whole pages.
    #[error("--memory size={size}: not a multiple of 4 KiB; use whole pages (e.g. 512M)")]
    MemoryUnaligned {
        /// The requested size.
        size: Size,
    },
    /// More memory than the host has.
    #[error(
        "--memory size={size}: this host has only {host} of physical memory; choose a smaller size"
    )]
    MemoryAboveHost {
        /// The requested size.
        size: Size,
        /// The host's total physical memory.
        host: HumanSize,
    },
    /// An unknown `--serial` mode.
    #[error("--serial: unknown mode '{value}' (valid: {SERIAL_MODES})")]
    UnknownSerialMode {
        /// The text given.
        value: String,
    },
    /// `--serial file=` or `socket=` without a path.
    #[error("--serial {mode}=: the path is empty; write {mode}=PATH")]
    EmptySerialPath {
        /// `file` or `socket`.
        mode: &'static str,
    },
    /// A kernel or initramfs file that cannot be read.
    #[error("{option} {}: cannot read it: {source}", path.display())]
    Unreadable {
        /// `--kernel` or `--initramfs`.
        option: &'static str,
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A kernel or initramfs path that is not a regular file.
    #[error("{option} {}: is {kind}, not a regular file; give the path of the image file", path.display())]
    NotAFile {
        /// `--kernel` or `--initramfs`.
        option: &'static str,
        /// The path given.
        path: PathBuf,
        /// What it is instead, e.g. "a directory".
        kind: &'static str,
    },
    /// A command line with a NUL byte, which would cut it short in the guest.
    #[error("--cmdline: contains a NUL byte at offset {offset}; remove it")]
    CmdlineNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
}

/// A byte count shown the way `--memory` takes it: the largest binary unit that divides it exactly (`512M`, `0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "T"),
            (1 << 30, "G"),
            (1 << 20, "M"),
            (1 << 10, "K"),
        ];
        if self.0 != 0 {
            for (unit, suffix) in UNITS {
                if self.0.is_multiple_of(unit) {
                    return write!(f, "{}{suffix}", self.0 / unit);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A byte count shown for people, rounded to a tenth: `23.4 GiB`, `512.0 MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (unit, suffix) in UNITS {
            if self.0 >= unit {
                // Lossy on purpose: this is for display only.
                return write!(f, "{:.1} {suffix}", self.0 as f64 / unit as f64);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// The `key=value` pairs of one option string, checked against the keys the option accepts.
struct OptionPairs<'a> {
    option: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> OptionPairs<'a> {
    /// Splits `input` at commas into `key=value` pairs; rejects empty entries, missing `=`, unknown and repeated
    /// keys, and empty values.
    fn parse(
        option: &'static str,
        input: &'a str,
        valid: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for entry in input.split(',') {
            if entry.is_empty() {
                return Err(ConfigError::EmptyEntry {
                    option,
                    input: input.to_string(),
                    valid,
                });
            }
            let Some((key, value)) = entry.split_once('=') else {
                return Err(ConfigError::MissingEquals {
                    option,
                    entry: entry.to_string(),
                    valid,
                });
            };
            if !valid.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    valid,
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ConfigError::DuplicateKey {
                    option,
                    key: key.to_string(),
                });
            }
            if value.is_empty() {
                return Err(ConfigError::EmptyValue {
                    option,
                    key: key.to_string(),
                });
            }
            pairs.push((key, value));
        }
        Ok(OptionPairs { option, pairs })
    }

    /// The value of `key`, if given.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of `key` as a `u32`, if given.
    fn get_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let number = parse_decimal(value).ok_or_else(|| ConfigError::InvalidNumber {
            option: self.option,
            key: key.to_string(),
            value: value.to_string(),
        })?;
        let too_large = || ConfigError::NumberTooLarge {
            option: self.option,
            key: key.to_string(),
            value: value.to_string(),
            max: u64::from(u32::MAX),
        };
        let number = number.ok_or_else(too_large)?;
        u32::try_from(number).map(Some).map_err(|_| too_large())
    }
}

/// Parses ASCII decimal digits: `None` if `s` is not all digits, `Some(None)` if the number overflows `u64`.
fn parse_decimal(s: &str) -> Option<Option<u64>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    }))
}

/// Parses a size: decimal bytes, or a number with a binary suffix `K`, `M`, `G`, `T` (any case, optionally followed
/// by `iB`), e.g. `512M`, `2GiB`, `4096`.
fn parse_size(value: &str) -> Result<u64, ConfigError> {
    let invalid = || ConfigError::InvalidSize {
        value: value.to_string(),
    };
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => return Err(invalid()),
    };
    let number = parse_decimal(digits).ok_or_else(invalid)?;
    number
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| ConfigError::SizeOverflow {
            value: value.to_string(),
        })
}

/// vCPU counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    /// vCPUs running at boot.
    pub boot_vcpus: u32,
    /// vCPUs the platform describes (boot plus hot-pluggable).
    pub max_vcpus: u32,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

impl CpusConfig {
    /// Parses `boot=N[,max=M]` (`--cpus`). `boot` defaults to 1 and `max` to `boot`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let pairs = OptionPairs::parse(CPUS_OPTION, s, CPUS_KEYS)?;
        let boot_vcpus = pairs.get_u32("boot")?.unwrap_or(1);
        let max_vcpus = pairs.get_u32("max")?.unwrap_or(boot_vcpus);
        let cpus = CpusConfig {
            boot_vcpus,
            max_vcpus,
        };
        cpus.validate()?;
        Ok(cpus)
    }

    /// At least one boot vCPU, no more than `max`, and `max` within the xAPIC ID range.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.boot_vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.max_vcpus < self.boot_vcpus {
            return Err(ConfigError::BootAboveMax {
                boot: self.boot_vcpus,
                max: self.max_vcpus,
            });
        }
        if self.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.max_vcpus,
            });
        }
        Ok(())
    }
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Size in bytes.
    pub size: u64,
    /// How much memory can be hot-added (bytes; 0: none).
    #[serde(default)]
    pub hotplug_size: u64,
    /// How memory is hot-added (and, with virtio-mem, removed again).
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
}

/// How memory is hot-added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HotplugMethod {
    /// ACPI memory devices announced through the GED.
    #[default]
    Acpi,
    /// A virtio-mem device managing a region of `hotplug_size` bytes, which the guest plugs and unplugs in 2 MiB
    /// blocks.
    VirtioMem,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hotplug_size: 0,
            hotplug_method: HotplugMethod::Acpi,
        }
    }
}

impl MemoryConfig {
    /// Parses `size=SIZE[,hotplug_size=SIZE][,hotplug_method=acpi|virtio-mem]` (`--memory`). SIZE is decimal bytes
    /// or a number with a binary suffix `K`, `M`, `G`, `T` (any case, optionally followed by `iB`). Without `size`
    /// the default (512 MiB) stays.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let pairs = OptionPairs::parse(MEMORY_OPTION, s, MEMORY_KEYS)?;
        let size = match pairs.get("size") {
            Some(value) => parse_size(value)?,
            None => DEFAULT_MEMORY_SIZE,
        };
        let hotplug_size = match pairs.get("hotplug_size") {
            Some(value) => parse_size(value)?,
            None => 0,
        };
        let hotplug_method = match pairs.get("hotplug_method") {
            None | Some("acpi") => HotplugMethod::Acpi,
            Some("virtio-mem") => HotplugMethod::VirtioMem,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    option: MEMORY_OPTION,
                    key: "hotplug_method",
                    value: other.to_string(),
                    expected: "use acpi or virtio-mem",
                })
            }
        };
        let memory = MemoryConfig {
            size,
            hotplug_size,
            hotplug_method,
        };
        memory.validate()?;
        Ok(memory)
    }

    /// At least [`MIN_MEMORY_SIZE`], in whole pages; hot-pluggable memory in 128 MiB blocks (Linux's memory block
    /// size, which both ACPI memory devices and a virtio-mem region are aligned to).
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.hotplug_size.is_multiple_of(MEMORY_HOTPLUG_ALIGNMENT) {
            return Err(ConfigError::InvalidValue {
                option: MEMORY_OPTION,
                key: "hotplug_size",
                value: self.hotplug_size.to_string(),
                expected: "use a multiple of 128M (the guest adds memory in 128 MiB blocks)",
            });
        }
        if self.size < MIN_MEMORY_SIZE {
            return Err(ConfigError::MemoryTooSmall {
                size: Size(self.size),
            });
        }
        if !self.size.is_multiple_of(MEMORY_ALIGNMENT) {
            return Err(ConfigError::MemoryUnaligned {
                size: Size(self.size),
            });
        }
        Ok(())
    }

    /// No more than the host's physical memory, when that is known.
    fn validate_against_host(&self, host_memory: Option<u64>) -> Result<(), ConfigError> {
        match host_memory {
            Some(host) if self.size > host => Err(ConfigError::MemoryAboveHost {
                size: Size(self.size),
                host: HumanSize(host),
            }),
            _ => Ok(()),
        }
    }
}

/// The host's physical memory in bytes (`MemTotal` in /proc/meminfo), or `None` if it cannot be read.
fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total(&meminfo)
}

/// The `MemTotal:` line of /proc/meminfo text, in bytes.
fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut fields = line.split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// Which kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// The demo guest built into the binary (no `--kernel`).
    BuiltinDemo,
    /// A kernel image file (bzImage, ELF vmlinux or PVH ELF).
    Path(PathBuf),
}

/// What the guest boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// An initramfs to load next to it.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        PayloadConfig::new(None, None, None)
    }
}

impl PayloadConfig {
    /// The payload for the given options: the built-in demo when `kernel` is `None`. Without `cmdline`, a user
    /// kernel gets [`DEFAULT_KERNEL_CMDLINE`] and the demo an empty command line.
    pub fn new(
        kernel: Option<PathBuf>,
        initramfs: Option<PathBuf>,
        cmdline: Option<String>,
    ) -> Self {
        let kernel = match kernel {
            Some(path) => KernelSource::Path(path),
            None => KernelSource::BuiltinDemo,
        };
        let cmdline = cmdline.unwrap_or_else(|| match kernel {
            KernelSource::BuiltinDemo => String::new(),
            KernelSource::Path(_) => DEFAULT_KERNEL_CMDLINE.to_string(),
        });
        PayloadConfig {
            kernel,
            initramfs,
            cmdline,
        }
    }

    /// Kernel and initramfs are readable regular files; the command line has no NUL byte.
    fn validate(&self) -> Result<(), ConfigError> {
        if let KernelSource::Path(path) = &self.kernel {
            check_image_file("--kernel", path)?;
        }
        if let Some(path) = &self.initramfs {
            check_image_file("--initramfs", path)?;
        }
        if let Some(offset) = self.cmdline.bytes().position(|b| b == 0) {
            return Err(ConfigError::CmdlineNul { offset });
        }
        Ok(())
    }
}

/// `path` is a regular file this process can open for reading.
fn check_image_file(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    let unreadable = |source| ConfigError::Unreadable {
        option,
        path: path.to_path_buf(),
        source,
    };
    let file_type = std::fs::metadata(path).map_err(unreadable)?.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "a directory"
        } else {
            "a special file"
        };
        return Err(ConfigError::NotAFile {
            option,
            path: path.to_path_buf(),
            kind,
        });
    }
    File::open(path).map_err(unreadable)?;
    Ok(())
}

/// Where the serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleOutputMode {
    /// No serial device at all.
    Off,
    /// The device exists; its output is discarded.
    Null,
    /// The VMM's stdout and stdin.
    #[default]
    Tty,
    /// Output written to this file (created or truncated).
    File(PathBuf),
    /// A Unix socket at this path that one client at a time can connect to.
    Socket(PathBuf),
}

impl ConsoleOutputMode {
    /// Parses `tty`, `null`, `off`, `file=PATH` or `socket=PATH` (`--serial`). Everything after `file=` or
    /// `socket=` is the path, commas included.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let path_of = |mode: &'static str, path: &str| {
            if path.is_empty() {
                Err(ConfigError::EmptySerialPath { mode })
            } else {
                Ok(PathBuf::from(path))
            }
        };
        match s {
            "off" => Ok(ConsoleOutputMode::Off),
            "null" => Ok(ConsoleOutputMode::Null),
            "tty" => Ok(ConsoleOutputMode::Tty),
            _ => {
                if let Some(path) = s.strip_prefix("file=") {
                    path_of("file", path).map(ConsoleOutputMode::File)
                } else if let Some(path) = s.strip_prefix("socket=") {
                    path_of("socket", path).map(ConsoleOutputMode::Socket)
                } else {
                    Err(ConfigError::UnknownSerialMode {
                        value: s.to_string(),
                    })
                }
            }
        }
    }

    /// File and socket modes name a path.
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ConsoleOutputMode::File(path) if path.as_os_str().is_empty() => {
                Err(ConfigError::EmptySerialPath { mode: "file" })
            }
            ConsoleOutputMode::Socket(path) if path.as_os_str().is_empty() => {
                Err(ConfigError::EmptySerialPath { mode: "socket" })
            }
            _ => Ok(()),
        }
    }
}

/// What a guest triple fault does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripleFaultAction {
    /// Stop with a guest-crash report (exit code 3).
    #[default]
    Crash,
    /// Reset the VM, as real hardware does.
    Reboot,
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPU counts.
    pub cpus: CpusConfig,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Kernel, initramfs, command line.
    pub payload: PayloadConfig,
    /// The serial console.
    pub serial: ConsoleOutputMode,
    /// Whether the debug-exit port (0xf4) is present.
    pub debug_exit: bool,
    /// Whether a guest reset ends the VMM instead of rebooting the guest.
    pub no_reboot: bool,
    /// What a guest triple fault does.
    pub triple_fault: TripleFaultAction,
    /// How much the VMM logs: 0 is errors only, each step up is one more `tracing` level.
    #[serde(default)]
    pub verbosity: u8,
    /// The virtio console (`None`: no virtio console device).
    #[serde(default)]
    pub console: Option<ConsoleOutputMode>,
    /// Block devices, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network devices.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The entropy device, if any.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// Firmware to boot instead of a kernel (`None`: Atrium loads the kernel itself).
    #[serde(default)]
    pub firmware: Option<FirmwareConfig>,
    /// The firmware debug console on port 0x402 (QEMU's "debugcon"); `None`: no port.
    #[serde(default)]
    pub debug_console: Option<ConsoleOutputMode>,
}

/// Booting through firmware (`--firmware`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareConfig {
    /// The firmware image (e.g. SeaBIOS's `bios-256k.bin`), mapped read-only so that it ends at 4 GiB.
    pub path: PathBuf,
    /// Seconds the firmware keeps looking for a bootable disk before Atrium gives up.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: u32,
}

/// `--boot-timeout` when not given, in seconds.
pub const DEFAULT_BOOT_TIMEOUT: u32 = 10;

fn default_boot_timeout() -> u32 {
    DEFAULT_BOOT_TIMEOUT
}

impl FirmwareConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_image_file("--firmware", &self.path)?;
        if self.boot_timeout == 0 {
            return Err(ConfigError::ZeroBootTimeout);
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks the whole configuration: vCPU counts, memory size (also against the host's physical memory), that the
    /// kernel and initramfs are readable regular files, the command line and the serial mode. KVM's own vCPU limit is
    /// checked later, when KVM is open.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_against(host_memory())
    }

    fn validate_against(&self, host_memory: Option<u64>) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        self.memory.validate()?;
        self.memory.validate_against_host(host_memory)?;
        self.payload.validate()?;
        if let Some(firmware) = &self.firmware {
            if matches!(self.payload.kernel, KernelSource::Path(_)) {
                return Err(ConfigError::FirmwareWithKernel);
            }
            firmware.validate()?;
        }
        if let Some(debug_console) = &self.debug_console {
            debug_console.validate()?;
        }
        self.serial.validate()?;
        if let Some(console) = &self.console {
            console.validate()?;
            if *console == ConsoleOutputMode::Tty && self.serial == ConsoleOutputMode::Tty {
                return Err(ConfigError::TwoTtyConsoles);
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for id in self.nets.iter().filter_map(|n| n.id.as_ref()) {
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId { id: id.clone() });
            }
        }
        for disk in &self.disks {
            disk.validate()?;
            if let Some(id) = &disk.id {
                if !ids.insert(id.clone()) {
                    return Err(ConfigError::DuplicateDeviceId { id: id.clone() });
                }
            }
        }
        Ok(())
    }
}

mod devices;
pub use devices::{DiskConfig, DiskImageFormat, NetConfig, RngConfig, VsockConfig};

#[cfg(test)]
mod tests;
