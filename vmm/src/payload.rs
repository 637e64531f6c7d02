//! Loading the guest payload: the kernel (bzImage, 64-bit ELF vmlinux or PVH ELF, detected from the file), the
//! command line and the initramfs.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arch::BootProtocol;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use crate::config::{KernelSource, PayloadConfig};

/// Offset of the 64-bit entry point in a bzImage's protected-mode code (Linux boot protocol).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the setup header's "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// initrd_addr_max the boot protocol says to assume when the kernel does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The kernel or initramfs could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a bzImage nor an ELF.
    #[error(
        "{0}: not a kernel Atrium can boot (expected a bzImage or an x86_64 ELF vmlinux/PVH image)"
    )]
    UnknownFormat(String),
    /// The bzImage has no 64-bit entry point.
    #[error("{0}: this bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64); build a 64-bit kernel")]
    Not64Bit(String),
    /// The kernel is larger than the guest's memory.
    #[error("{name}: the kernel ({size} bytes) does not fit in guest memory ({mem} MiB); raise --memory size=")]
    KernelTooLarge {
        /// Kernel name.
        name: String,
        /// Kernel file size.
        size: u64,
        /// Guest memory in MiB.
        mem: u64,
    },
    /// The loader rejected the image.
    #[error("{name}: cannot load the kernel: {reason}")]
    Load {
        /// Kernel name.
        name: String,
        /// The loader's reason.
        reason: String,
    },
    /// The initramfs is too large for the space below the kernel's limit.
    #[error("initramfs {path}: {size} bytes do not fit in guest memory below {limit:#x}; raise --memory size= or use a smaller initramfs")]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The command line has characters the kernel can't take.
    #[error("invalid kernel command line: {0}")]
    CmdlineInvalid(String),
    /// Writing to guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Where and how the guest starts, and what `arch::configure_system` needs to describe it.
#[derive(Debug)]
pub struct LoadedPayload {
    /// The first instruction the boot vCPU runs.
    pub entry: GuestAddress,
    /// The entry convention.
    pub protocol: BootProtocol,
    /// The bzImage setup header, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
    /// Where the command line (NUL terminated) was written and its size including the NUL.
    pub cmdline: (GuestAddress, usize),
    /// Where the initramfs was placed.
    pub initramfs: Option<(GuestAddress, usize)>,
}

/// Loads kernel, command line and initramfs into `mem`.
pub fn load(
    mem: &GuestMemoryMmap,
    payload: &PayloadConfig,
    builtin: &'static [u8],
) -> Result<LoadedPayload, PayloadError> {
    let kernel = match &payload.kernel {
        KernelSource::BuiltinDemo => {
            load_kernel(mem, "built-in demo guest", &mut Cursor::new(builtin))?
        }
        KernelSource::Path(path) => {
            let mut file = File::open(path).map_err(|source| PayloadError::Read {
                what: "kernel",
                path: path.clone(),
                source,
            })?;
            load_kernel(mem, &path.display().to_string(), &mut file)?
        }
    };

    let max_cmdline = match &kernel.setup_header {
        // The header's cmdline_size excludes the NUL; boot protocols before 2.06 imply 255.
        Some(hdr) if hdr.version >= 0x0206 => hdr.cmdline_size as usize,
        Some(_) => 255,
        None => arch::layout::CMDLINE_MAX_SIZE - 1,
    }
    .min(arch::layout::CMDLINE_MAX_SIZE - 1);
    let cmdline = load_cmdline(mem, &payload.cmdline, max_cmdline)?;

    let initramfs = match &payload.initramfs {
        Some(path) => {
            let addr_max = match &kernel.setup_header {
                Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
                _ => DEFAULT_INITRD_ADDR_MAX,
            };
            Some(load_initramfs(mem, path, addr_max, kernel.end)?)
        }
        None => None,
    };

    Ok(LoadedPayload {
        entry: kernel.entry,
        protocol: kernel.protocol,
        setup_header: kernel.setup_header,
        cmdline,
        initramfs,
    })
}

struct LoadedKernel {
    entry: GuestAddress,
    protocol: BootProtocol,
    setup_header: Option<setup_header>,
    /// First byte past everything the kernel may use in place (for bzImage, its decompression area).
    end: u64,
}

fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    name: &str,
    image: &mut F,
) -> Result<LoadedKernel, PayloadError> {
    let read_err = |source| PayloadError::Read {
        what: "kernel",
        path: PathBuf::from(name),
        source,
    };
    let size = image.seek(SeekFrom::End(0)).map_err(read_err)?;
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    if size >= mem_size.saturating_sub(arch::layout::HIGH_RAM_START) {
        return Err(PayloadError::KernelTooLarge {
            name: name.to_string(),
            size,
            mem: mem_size >> 20,
        });
    }

    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let elf = image.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mut hdrs = [0u8; 4];
    let bzimage = image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).is_ok()
        && image.read_exact(&mut hdrs).is_ok()
        && hdrs == *b"HdrS";
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;

    let load_err = |e: loader::Error| PayloadError::Load {
        name: name.to_string(),
        reason: e.to_string(),
    };
    let highmem = Some(GuestAddress(arch::layout::HIGH_RAM_START));
    if elf {
        let result = Elf::load(mem, None, image, highmem).map_err(load_err)?;
        let (entry, protocol) = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::PvhBoot),
            _ => (result.kernel_load, BootProtocol::LinuxBoot),
        };
        return Ok(LoadedKernel {
            entry,
            protocol,
            setup_header: None,
            end: result.kernel_end,
        });
    }
    if !bzimage {
        return Err(PayloadError::UnknownFormat(name.to_string()));
    }
    let result = BzImage::load(mem, None, image, highmem).map_err(load_err)?;
    let hdr = result
        .setup_header
        .ok_or_else(|| PayloadError::UnknownFormat(name.to_string()))?;
    if hdr.version >= 0x020c && hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(PayloadError::Not64Bit(name.to_string()));
    }
    let load = result.kernel_load.0;
    let end = result
        .kernel_end
        .max(load.saturating_add(u64::from(hdr.init_size)));
    Ok(LoadedKernel {
        entry: GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET),
        protocol: BootProtocol::LinuxBoot,
        setup_header: Some(hdr),
        end,
    })
}

fn load_cmdline(
    mem: &GuestMemoryMmap,
    text: &str,
    max: usize,
) -> Result<(GuestAddress, usize), PayloadError> {
    if text.len() > max {
        return Err(PayloadError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    let mut cmdline =
        Cmdline::new(max + 1).map_err(|e| PayloadError::CmdlineInvalid(e.to_string()))?;
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| PayloadError::CmdlineInvalid(e.to_string()))?;
    }
    let addr = GuestAddress(arch::layout::CMDLINE_START);
    loader::load_cmdline(mem, addr, &cmdline)
        .map_err(|_| PayloadError::GuestWrite("kernel command line"))?;
    Ok((addr, text.len() + 1))
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    addr_max: u64,
    kernel_end: u64,
) -> Result<(GuestAddress, usize), PayloadError> {
    let read_err = |source| PayloadError::Read {
        what: "initramfs",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let too_large = || PayloadError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        limit: addr_max,
    };
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let addr =
        arch::initramfs_load_addr(mem, len, addr_max, kernel_end).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(addr, &mut file, len)
        .map_err(|_| PayloadError::GuestWrite("initramfs"))?;
    Ok((addr, len))
}
