//! Device options: `--disk`, `--net`, `--rng`, `--vsock`, in Cloud Hypervisor's `key=value,...` style.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, OptionPairs};

const DISK_OPTION: &str = "--disk";
const DISK_KEYS: &[&str] = &[
    "path",
    "readonly",
    "direct",
    "num_queues",
    "queue_size",
    "serial",
    "id",
    "bootindex",
    "format",
];
const NET_OPTION: &str = "--net";
const NET_KEYS: &[&str] = &["tap", "fd", "mac", "num_queues", "queue_size", "id"];
const RNG_OPTION: &str = "--rng";
const RNG_KEYS: &[&str] = &["src"];
const VSOCK_OPTION: &str = "--vsock";
const VSOCK_KEYS: &[&str] = &["cid", "socket", "id"];

/// The longest virtio-blk serial (VIRTIO_BLK_ID_BYTES).
pub const MAX_DISK_SERIAL: usize = 20;
/// The largest virtqueue Atrium offers.
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// The most queues one device may have.
pub const MAX_QUEUES: u32 = 16;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// A block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image (raw or qcow2).
    pub path: PathBuf,
    /// Guest writes fail; the image is opened read-only and shared-locked.
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Request queues.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// What VIRTIO_BLK_T_GET_ID returns (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// A name to refer to the device by (for removal).
    #[serde(default)]
    pub id: Option<String>,
    /// Firmware boot order (lower boots first).
    #[serde(default)]
    pub bootindex: Option<u32>,
    /// The image format; `None` detects it from the file's first bytes.
    #[serde(default)]
    pub format: Option<DiskImageFormat>,
}

/// Disk image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskImageFormat {
    /// Disk byte n is file byte n.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

/// A network device on a tap interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap interface name; `None` means Atrium creates one (and removes it at exit).
    #[serde(default)]
    pub tap: Option<String>,
    /// A tap descriptor inherited from the parent process (instead of `tap`).
    #[serde(default)]
    pub fd: Option<i32>,
    /// The guest's MAC address.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Queues (two per queue pair).
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// A name to refer to the device by.
    #[serde(default)]
    pub id: Option<String>,
}

/// An entropy device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Where the bytes come from.
    pub src: PathBuf,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from("/dev/urandom"),
        }
    }
}

/// A vsock device whose host side is a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host-side Unix socket.
    pub socket: PathBuf,
    /// A name to refer to the device by.
    #[serde(default)]
    pub id: Option<String>,
}

fn parse_bool(option: &'static str, key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::InvalidValue {
            option,
            key,
            value: value.to_string(),
            expected: "use on or off",
        }),
    }
}

fn parse_queues(
    pairs: &OptionPairs,
    option: &'static str,
    default: u16,
) -> Result<u16, ConfigError> {
    match pairs.get_u32("num_queues")? {
        None => Ok(default),
        Some(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n as u16),
        Some(n) => Err(ConfigError::InvalidValue {
            option,
            key: "num_queues",
            value: n.to_string(),
            expected: "use 1 to 16 queues",
        }),
    }
}

fn parse_queue_size(pairs: &OptionPairs, option: &'static str) -> Result<u16, ConfigError> {
    match pairs.get_u32("queue_size")? {
        None => Ok(DEFAULT_QUEUE_SIZE),
        Some(n) if n.is_power_of_two() && n <= MAX_QUEUE_SIZE => Ok(n as u16),
        Some(n) => Err(ConfigError::InvalidValue {
            option,
            key: "queue_size",
            value: n.to_string(),
            expected: "use a power of two from 1 to 1024",
        }),
    }
}

fn parse_id(pairs: &OptionPairs, option: &'static str) -> Result<Option<String>, ConfigError> {
    match pairs.get("id") {
        None => Ok(None),
        Some("vmm") => Err(ConfigError::InvalidValue {
            option,
            key: "id",
            value: "vmm".to_string(),
            expected: "choose another id: 'vmm' names the VMM's own entry in vm.counters",
        }),
        Some(id)
            if id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Ok(Some(id.to_string()))
        }
        Some(id) => Err(ConfigError::InvalidValue {
            option,
            key: "id",
            value: id.to_string(),
            expected: "use letters, digits, '-' and '_'",
        }),
    }
}

impl DiskConfig {
    /// Parses `path=PATH[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,serial=ID][,id=NAME][,bootindex=N]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let pairs = OptionPairs::parse(DISK_OPTION, s, DISK_KEYS)?;
        let path = pairs.get("path").ok_or(ConfigError::MissingKey {
            option: DISK_OPTION,
            key: "path",
        })?;
        let flag = |key: &'static str| {
            pairs
                .get(key)
                .map(|v| parse_bool(DISK_OPTION, key, v))
                .transpose()
                .map(|v| v.unwrap_or(false))
        };
        let serial = match pairs.get("serial") {
            Some(s) if s.len() > MAX_DISK_SERIAL || !s.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(ConfigError::InvalidValue {
                    option: DISK_OPTION,
                    key: "serial",
                    value: s.to_string(),
                    expected: "use at most 20 printable ASCII characters",
                })
            }
            other => other.map(str::to_string),
        };
        Ok(DiskConfig {
            path: PathBuf::from(path),
            readonly: flag("readonly")?,
            direct: flag("direct")?,
            num_queues: parse_queues(&pairs, DISK_OPTION, 1)?,
            queue_size: parse_queue_size(&pairs, DISK_OPTION)?,
            serial,
            id: parse_id(&pairs, DISK_OPTION)?,
            bootindex: pairs.get_u32("bootindex")?,
            format: match pairs.get("format") {
                None => None,
                Some("raw") => Some(DiskImageFormat::Raw),
                Some("qcow2") => Some(DiskImageFormat::Qcow2),
                Some(other) => {
                    return Err(ConfigError::InvalidValue {
                        option: DISK_OPTION,
                        key: "format",
                        value: other.to_string(),
                        expected: "use raw or qcow2",
                    })
                }
            },
        })
    }

    /// Checks the image exists and is a regular file or block device the VMM can open.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::DeviceFile {
            option: DISK_OPTION,
            key: "path",
            path: self.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| bad(e.to_string()))?;
        if meta.is_dir() {
            return Err(bad("is a directory, not a disk image".into()));
        }
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(!self.readonly);
        open.open(&self.path)
            .map_err(|e| bad(format!("cannot open it: {e}")))?;
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,num_queues=N][,queue_size=N][,id=NAME]`; `tap=` empty or absent lets Atrium
    /// create the tap.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        // `tap=` with an empty value is meaningful here: drop it before the generic parser rejects it.
        let cleaned: Vec<&str> = s.split(',').filter(|e| *e != "tap=").collect();
        let cleaned = cleaned.join(",");
        let pairs = if cleaned.is_empty() {
            OptionPairs {
                option: NET_OPTION,
                pairs: Vec::new(),
            }
        } else {
            OptionPairs::parse(NET_OPTION, &cleaned, NET_KEYS)?
        };
        let tap = match pairs.get("tap") {
            Some(t) if t.len() >= 16 || t.contains('/') => {
                return Err(ConfigError::InvalidValue {
                    option: NET_OPTION,
                    key: "tap",
                    value: t.to_string(),
                    expected: "interface names have at most 15 characters and no '/'",
                })
            }
            other => other.map(str::to_string),
        };
        let mac = match pairs.get("mac") {
            None => None,
            Some(m) => match parse_mac(m) {
                Some(mac) if mac[0] & 1 == 0 => Some(mac),
                _ => {
                    return Err(ConfigError::InvalidValue {
                        option: NET_OPTION,
                        key: "mac",
                        value: m.to_string(),
                        expected: "use a unicast MAC like 52:54:00:12:34:56",
                    })
                }
            },
        };
        let num_queues = parse_queues(&pairs, NET_OPTION, 2)?;
        if num_queues % 2 != 0 {
            return Err(ConfigError::InvalidValue {
                option: NET_OPTION,
                key: "num_queues",
                value: num_queues.to_string(),
                expected: "use an even number (one receive and one transmit queue per pair)",
            });
        }
        let fd = match pairs.get_u32("fd")? {
            None => None,
            Some(fd) if fd < 3 || fd > i32::MAX as u32 => {
                return Err(ConfigError::InvalidValue {
                    option: NET_OPTION,
                    key: "fd",
                    value: fd.to_string(),
                    expected:
                        "descriptors 0-2 are stdin/stdout/stderr; pass the tap as fd 3 or higher",
                })
            }
            Some(fd) => Some(fd as i32),
        };
        if fd.is_some() && (tap.is_some() || num_queues != 2) {
            return Err(ConfigError::InvalidValue {
                option: NET_OPTION,
                key: "fd",
                value: fd.map(|f| f.to_string()).unwrap_or_default(),
                expected:
                    "an fd is one tap queue pair: give no tap= and no num_queues other than 2",
            });
        }
        Ok(NetConfig {
            tap,
            fd,
            mac,
            num_queues,
            queue_size: parse_queue_size(&pairs, NET_OPTION)?,
            id: parse_id(&pairs, NET_OPTION)?,
        })
    }
}

impl RngConfig {
    /// Parses `[src=PATH]` (an empty string keeps /dev/urandom).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        if s.is_empty() {
            return Ok(RngConfig::default());
        }
        let pairs = OptionPairs::parse(RNG_OPTION, s, RNG_KEYS)?;
        Ok(RngConfig {
            src: pairs
                .get("src")
                .map(PathBuf::from)
                .unwrap_or_else(|| RngConfig::default().src),
        })
    }
}

impl VsockConfig {
    /// Parses `cid=N,socket=PATH[,id=NAME]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let pairs = OptionPairs::parse(VSOCK_OPTION, s, VSOCK_KEYS)?;
        let cid = pairs.get_u32("cid")?.ok_or(ConfigError::MissingKey {
            option: VSOCK_OPTION,
            key: "cid",
        })?;
        if cid < 3 || cid == u32::MAX {
            return Err(ConfigError::InvalidValue {
                option: VSOCK_OPTION,
                key: "cid",
                value: cid.to_string(),
                expected: "context ids 0-2 and 0xffffffff are reserved; use 3 or more",
            });
        }
        let socket = pairs.get("socket").ok_or(ConfigError::MissingKey {
            option: VSOCK_OPTION,
            key: "socket",
        })?;
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(socket),
            id: parse_id(&pairs, VSOCK_OPTION)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn disk_defaults_and_every_key() {
        let d = DiskConfig::parse("path=/a.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(!d.readonly && !d.direct);
        assert_eq!((d.num_queues, d.queue_size), (1, 256));
        let d = DiskConfig::parse(
            "path=/b.qcow2,readonly=on,direct=true,num_queues=4,queue_size=128,serial=SER-1,id=disk9,bootindex=0,format=qcow2",
        )
        .unwrap();
        assert!(d.readonly && d.direct);
        assert_eq!((d.num_queues, d.queue_size), (4, 128));
        assert_eq!(d.serial.as_deref(), Some("SER-1"));
        assert_eq!(d.id.as_deref(), Some("disk9"));
        assert_eq!(d.bootindex, Some(0));
        assert_eq!(d.format, Some(DiskImageFormat::Qcow2));
        assert_eq!(
            err(DiskConfig::parse("path=/a,format=vmdk")),
            "--disk format=vmdk: use raw or qcow2"
        );
    }

    #[test]
    fn disk_errors() {
        assert_eq!(
            err(DiskConfig::parse("readonly=on")),
            "--disk: 'path=' is required"
        );
        assert_eq!(
            err(DiskConfig::parse("path=/a,readonly=yes")),
            "--disk readonly=yes: use on or off"
        );
        assert_eq!(
            err(DiskConfig::parse("path=/a,queue_size=100")),
            "--disk queue_size=100: use a power of two from 1 to 1024"
        );
        assert_eq!(
            err(DiskConfig::parse("path=/a,num_queues=0")),
            "--disk num_queues=0: use 1 to 16 queues"
        );
        assert_eq!(
            err(DiskConfig::parse("path=/a,serial=123456789012345678901")),
            "--disk serial=123456789012345678901: use at most 20 printable ASCII characters"
        );
        assert_eq!(
            err(DiskConfig::parse("path=/a,id=a b")),
            "--disk id=a b: use letters, digits, '-' and '_'"
        );
        assert!(err(DiskConfig::parse("path=/a,size=1")).contains("unknown key 'size'"));
    }

    #[test]
    fn disk_validate_names_the_file() {
        let d = DiskConfig::parse("path=/nonexistent/disk.img").unwrap();
        let e = err(d.validate());
        assert!(e.starts_with("--disk path=/nonexistent/disk.img: "), "{e}");
        let d = DiskConfig::parse("path=/").unwrap();
        assert_eq!(
            err(d.validate()),
            "--disk path=/: is a directory, not a disk image"
        );
    }

    #[test]
    fn net_parsing() {
        let n = NetConfig::parse("tap=").unwrap();
        assert_eq!(n.tap, None);
        assert_eq!(n.num_queues, 2);
        let n = NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56,num_queues=4,id=net2").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(n.num_queues, 4);
        assert_eq!(
            err(NetConfig::parse("tap=t,mac=01:00:00:00:00:00")),
            "--net mac=01:00:00:00:00:00: use a unicast MAC like 52:54:00:12:34:56"
        );
        assert_eq!(
            err(NetConfig::parse("tap=t,mac=52:54:00:12:34")),
            "--net mac=52:54:00:12:34: use a unicast MAC like 52:54:00:12:34:56"
        );
        assert_eq!(
            err(NetConfig::parse("num_queues=3")),
            "--net num_queues=3: use an even number (one receive and one transmit queue per pair)"
        );
        assert!(err(NetConfig::parse("tap=averyveryverylongname")).contains("at most 15"));
        assert_eq!(NetConfig::parse("fd=3").unwrap().fd, Some(3));
        assert!(err(NetConfig::parse("fd=1")).contains("pass the tap as fd 3 or higher"));
        assert!(err(NetConfig::parse("fd=4,tap=t0")).contains("one tap queue pair"));
    }

    #[test]
    fn rng_and_vsock_parsing() {
        assert_eq!(
            RngConfig::parse("").unwrap().src,
            PathBuf::from("/dev/urandom")
        );
        assert_eq!(
            RngConfig::parse("src=/dev/random").unwrap().src,
            PathBuf::from("/dev/random")
        );
        let v = VsockConfig::parse("cid=3,socket=/run/vm1.vsock").unwrap();
        assert_eq!(
            (v.cid, v.socket.clone()),
            (3, PathBuf::from("/run/vm1.vsock"))
        );
        assert_eq!(
            err(VsockConfig::parse("cid=2,socket=/s")),
            "--vsock cid=2: context ids 0-2 and 0xffffffff are reserved; use 3 or more"
        );
        assert_eq!(
            err(VsockConfig::parse("cid=5")),
            "--vsock: 'socket=' is required"
        );
    }
}
