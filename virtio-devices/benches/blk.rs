//! Device-level virtio-blk benchmark: the same workload through a [`Block`] device's request queue and directly on the
//! same file, side by side. Prints JSON. Run with `cargo bench -p virtio-devices --bench blk`.
//!
//! Workloads: 4 KiB random reads and writes at queue depth 1 and 32, 1 MiB sequential reads and writes at depth 1,
//! over a 1 GiB raw image. Each run issues operations for [`PHASE`] (at most one pass over the image), then waits for
//! the ones in flight. Offsets come from a seeded bijection, so both paths issue the same operations in the same
//! order and a random workload never touches a block twice. Every workload runs [`ROUNDS`] times per path, the
//! order of the two paths alternating, and the median is reported: the bench shares a noisy machine. Next to the
//! throughput it reports the CPU time per operation of every thread involved (from each thread's `schedstat`),
//! which moves much less with the machine's load than throughput does.
//!
//! Device path: a `Block` over a `RawFile`, activated on 256 MiB of guest memory with one 256-entry split queue and
//! an interrupt that only counts. The driver, on this thread, writes three-descriptor chains (header, data, status)
//! into the queue, publishes them, kicks the queue eventfd when the device's `avail_event` asks for it (EVENT_IDX)
//! and sleeps on an eventfd the interrupt signals (`ATRIUM_BLK_BENCH_WAIT=spin`: spins on the used index instead,
//! which on a machine with few idle cores starves the device thread); at depth 32 it refills a slot as soon as its
//! request completes. The device uses io_uring (`ATRIUM_BLK_BENCH_ENGINE=sync`: its synchronous path instead).
//!
//! Direct path: `pread`/`pwrite` of the same sizes at the same offsets on a second descriptor of the same file; at
//! depth 32, 32 threads taking the next operation from a shared counter (the way an application without io_uring
//! gets 32 requests in flight).
//!
//! Durability is the same on both paths. By default the driver negotiates VIRTIO_BLK_F_FLUSH (a write cache): the
//! device does not sync after every write, and the direct path does not either; writes land in the page cache.
//! With `ATRIUM_BLK_BENCH_WRITE_CACHE=off` the driver does not negotiate it, so every device write is durable when
//! it completes (`RWF_DSYNC`, or a sync on the synchronous path), and the direct path opens the file `O_DSYNC`.
//!
//! Caching: both paths use buffered I/O (the raw backend has no O_DIRECT mode). In the default `cold` mode every run
//! starts with the image synced and evicted from the page cache with `POSIX_FADV_DONTNEED`; residency is checked
//! with `mincore`, and if pages remain the bench writes 3 to `/proc/sys/vm/drop_caches` (which needs root). Reads
//! therefore reach the disk; writes land in the page cache and are written back, untimed, by the next sync. With
//! `ATRIUM_BLK_BENCH_CACHE=warm` the image is read into the page cache once and never evicted, which measures the
//! device's own cost against memory-speed system calls. `ATRIUM_BLK_BENCH_ONLY=<text>` runs only the workloads whose
//! name contains the text.
//!
//! Every 4 KiB block of the image starts with its own block number and writes keep that layout, so reads are
//! checked on both paths, and every device request's status byte and used length are checked too.

use std::error::Error;
use std::fs::File;
use std::io::Write;
use std::num::Wrapping;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_devices::{
    Block, BlockOptions, GuestMemoryMmap, IoEngine, RawFile, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Size of the test image.
const FILE_SIZE: u64 = 1 << 30;
/// The unit of the random workloads and of the block-number stamps.
const BLOCK: u64 = 4096;
/// The unit of the sequential workloads.
const LARGE: u64 = 1 << 20;
/// Guest memory of the device path.
const MEM_SIZE: usize = 256 << 20;
/// Entries in the request queue.
const QUEUE_SIZE: u16 = 256;
/// Largest queue depth a workload uses.
const MAX_DEPTH: usize = 32;
/// How long a run issues operations.
const PHASE: Duration = Duration::from_millis(1000);
/// Runs per workload and path.
const ROUNDS: usize = 5;
/// A device that completes nothing for this long is declared stuck.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Fill byte of every block after its 8-byte stamp.
const FILL: u8 = 0x5a;

// Guest-physical layout of the device path.
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADERS: u64 = 0x4000;
const STATUSES: u64 = 0x5000;
/// One 1 MiB data buffer per slot from here.
const DATA: u64 = 0x100_0000;

const AVAIL_USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_SIZE as u64;
const USED_AVAIL_EVENT: u64 = USED_RING + 4 + 8 * QUEUE_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    kind: Kind,
    pattern: Pattern,
    size: u64,
    depth: usize,
    seed: u64,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread_4k_qd1",
        kind: Kind::Read,
        pattern: Pattern::Random,
        size: BLOCK,
        depth: 1,
        seed: 0x9e37_79b9,
    },
    Workload {
        name: "randread_4k_qd32",
        kind: Kind::Read,
        pattern: Pattern::Random,
        size: BLOCK,
        depth: 32,
        seed: 0xd1b5_4a32,
    },
    Workload {
        name: "randwrite_4k_qd1",
        kind: Kind::Write,
        pattern: Pattern::Random,
        size: BLOCK,
        depth: 1,
        seed: 0xa076_1d64,
    },
    Workload {
        name: "randwrite_4k_qd32",
        kind: Kind::Write,
        pattern: Pattern::Random,
        size: BLOCK,
        depth: 32,
        seed: 0xe703_7ed1,
    },
    Workload {
        name: "seqread_1m_qd1",
        kind: Kind::Read,
        pattern: Pattern::Sequential,
        size: LARGE,
        depth: 1,
        seed: 0,
    },
    Workload {
        name: "seqwrite_1m_qd1",
        kind: Kind::Write,
        pattern: Pattern::Sequential,
        size: LARGE,
        depth: 1,
        seed: 0,
    },
];

/// A bijection on `bits`-bit numbers (xor, odd multiplies and xorshifts), so a random workload never touches a
/// block twice: a repeat would be served from the page cache and favour whichever path got further.
fn scatter(i: u64, bits: u32, seed: u64) -> u64 {
    let mask = (1u64 << bits) - 1;
    let mut x = (i ^ seed) & mask;
    for multiplier in [0x9e37_79b9_7f4a_7c15u64, 0xbf58_476d_1ce4_e5b9] {
        x = x.wrapping_mul(multiplier) & mask;
        x ^= x >> (bits / 2 + 1);
    }
    x
}

impl Workload {
    /// The byte offset of every operation, in issue order: one pass over the image.
    fn offsets(&self) -> Vec<u64> {
        let count = FILE_SIZE / self.size;
        match self.pattern {
            Pattern::Sequential => (0..count).map(|i| i * self.size).collect(),
            Pattern::Random => (0..count)
                .map(|i| scatter(i, count.trailing_zeros(), self.seed) * self.size)
                .collect(),
        }
    }
}

/// How the page cache is treated between runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheMode {
    Cold,
    Warm,
}

/// How the device path's driver waits for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitMode {
    /// Spin on the used index.
    Spin,
    /// Sleep on an eventfd the interrupt signals.
    Event,
}

/// The device's I/O engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// io_uring.
    Uring,
    /// The synchronous path.
    Sync,
}

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
struct Config {
    cache: CacheMode,
    wait: WaitMode,
    engine: Engine,
    /// The driver negotiates VIRTIO_BLK_F_FLUSH (and the direct path writes without O_DSYNC).
    write_cache: bool,
}

/// What one path achieved in one run.
#[derive(Clone, Copy, Debug)]
struct Run {
    ops: usize,
    elapsed: Duration,
    /// CPU time of the threads doing the work: the I/O threads on the direct path, the driver thread on the
    /// device path.
    cpu: Duration,
    /// CPU time of the device's own thread (device path only).
    device_cpu: Duration,
    /// CPU time of the kernel's io_uring worker threads serving the device (device path only): the device hands
    /// them the operations the kernel cannot do without blocking, such as buffered writes on ext4.
    ring_worker_cpu: Duration,
    kicks: u64,
    interrupts: u64,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per operation, all threads together.
    fn cpu_us_per_op(&self) -> f64 {
        (self.cpu + self.device_cpu + self.ring_worker_cpu).as_secs_f64() * 1e6 / self.ops as f64
    }
}

/// CPU time a thread has run, from its `schedstat` file under /proc (nanosecond resolution, unlike rusage ticks).
fn thread_cpu(schedstat: &Path) -> Result<Duration> {
    let text = std::fs::read_to_string(schedstat)?;
    let nanos = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .ok_or("unreadable schedstat")?;
    Ok(Duration::from_nanos(nanos))
}

/// CPU time of the calling thread.
fn own_cpu() -> Result<Duration> {
    thread_cpu(Path::new("/proc/thread-self/schedstat"))
}

/// CPU time so far of this process's io_uring worker threads (named `iou-wrk-<tid>`), by thread.
fn ring_worker_cpu() -> Result<Vec<(PathBuf, Duration)>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        let is_worker = std::fs::read_to_string(task.join("comm"))
            .is_ok_and(|comm| comm.starts_with("iou-wrk-"));
        // A worker that exited meanwhile has no schedstat any more.
        if let (true, Ok(cpu)) = (is_worker, thread_cpu(&task.join("schedstat"))) {
            found.push((task, cpu));
        }
    }
    Ok(found)
}

/// CPU time the io_uring workers used since `before` (workers that exited in between are not counted).
fn ring_worker_cpu_since(before: &[(PathBuf, Duration)]) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for (task, cpu) in ring_worker_cpu()? {
        let start = before
            .iter()
            .find(|(earlier, _)| *earlier == task)
            .map_or(Duration::ZERO, |(_, cpu)| *cpu);
        total += cpu.saturating_sub(start);
    }
    Ok(total)
}

/// The `schedstat` file of this process's thread named `name`; there must be exactly one. A new thread names itself
/// once it runs, so this looks again for a while before giving up.
fn named_thread_schedstat(name: &str) -> Result<PathBuf> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")? {
            let task = task?.path();
            // A thread that exited meanwhile has no comm any more.
            if std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim_end() == name)
            {
                found.push(task.join("schedstat"));
            }
        }
        match <[PathBuf; 1]>::try_from(found) {
            Ok([path]) => return Ok(path),
            Err(found) if found.is_empty() && Instant::now() < give_up => std::thread::yield_now(),
            Err(found) => {
                return Err(
                    format!("expected one thread named {name}, found {}", found.len()).into(),
                )
            }
        }
    }
}

/// Writes each 4 KiB block's number into its first 8 bytes; `buf` starts at byte `offset` of the image.
fn stamp(buf: &mut [u8], offset: u64) {
    for (i, block) in buf.chunks_mut(BLOCK as usize).enumerate() {
        let number = offset / BLOCK + i as u64;
        block[..8].copy_from_slice(&number.to_le_bytes());
    }
}

/// Checks a stamp read back from byte `offset` of the image.
fn check_stamp(found: u64, offset: u64) -> Result<()> {
    if found != offset / BLOCK {
        return Err(format!(
            "the block at byte {offset} carries stamp {found}, expected {}; the I/O path returned wrong data",
            offset / BLOCK
        )
        .into());
    }
    Ok(())
}

/// A directory inside the cargo target directory (so on the same file system as the build), removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("virtio-blk-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the stamped image and syncs it, so every block is allocated and on disk.
fn create_image(path: &Path) -> Result<()> {
    let mut file = File::create(path)?;
    let mut chunk = vec![FILL; LARGE as usize];
    for i in 0..FILE_SIZE / LARGE {
        stamp(&mut chunk, i * LARGE);
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Number of the image's pages in the page cache.
fn resident_pages(file: &File) -> Result<usize> {
    let len = FILE_SIZE as usize;
    // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the address, and the result is
    // checked against MAP_FAILED before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let page = 4096usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr` is the page-aligned start of a live `len`-byte mapping and `vec` holds one byte per page of
    // it. mincore only reports residency; it touches no page.
    let ret = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping created above, which nothing references any more.
    unsafe { libc::munmap(addr, len) };
    if ret != 0 {
        return Err(err.into());
    }
    Ok(vec.iter().filter(|&&v| v & 1 != 0).count())
}

/// Syncs the image and evicts it from the page cache; returns the pages still resident afterwards.
fn evict(path: &Path) -> Result<usize> {
    let file = File::open(path)?;
    file.sync_all()?;
    // SAFETY: fadvise takes only the open descriptor and a range; no memory is passed.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret).into());
    }
    let resident = resident_pages(&file)?;
    if resident == 0 {
        return Ok(0);
    }
    // Something kept pages (for instance writeback still in flight): fall back to dropping every clean cache.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    resident_pages(&file)
}

/// Reads the whole image so it sits in the page cache.
fn preload(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; LARGE as usize];
    for i in 0..FILE_SIZE / LARGE {
        file.read_exact_at(&mut buf, i * LARGE)?;
    }
    Ok(())
}

/// One operation on the direct path; `buf` is `size` bytes.
fn direct_op(file: &File, kind: Kind, buf: &mut [u8], offset: u64) -> Result<()> {
    match kind {
        Kind::Read => {
            file.read_exact_at(buf, offset)?;
            check_stamp(u64::from_le_bytes(buf[..8].try_into()?), offset)?;
            let last = buf.len() - BLOCK as usize;
            check_stamp(
                u64::from_le_bytes(buf[last..last + 8].try_into()?),
                offset + last as u64,
            )
        }
        Kind::Write => {
            stamp(buf, offset);
            file.write_all_at(buf, offset)?;
            Ok(())
        }
    }
}

/// The workload with `pread`/`pwrite`: inline at depth 1, `depth` threads otherwise.
fn run_direct(path: &Path, w: &Workload, offsets: &[u64], config: &Config) -> Result<Run> {
    let flags = if config.write_cache { 0 } else { libc::O_DSYNC };
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)?;
    let template = vec![FILL; w.size as usize];
    if w.depth == 1 {
        let mut buf = template;
        let cpu_start = own_cpu()?;
        let start = Instant::now();
        let mut ops = 0;
        for &offset in offsets {
            if start.elapsed() > PHASE {
                break;
            }
            direct_op(&file, w.kind, &mut buf, offset)?;
            ops += 1;
        }
        let elapsed = start.elapsed();
        return Ok(Run {
            ops,
            elapsed,
            cpu: own_cpu()? - cpu_start,
            device_cpu: Duration::ZERO,
            ring_worker_cpu: Duration::ZERO,
            kicks: 0,
            interrupts: 0,
        });
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let barrier = Barrier::new(w.depth);
    // Nanoseconds since `base` at which the first thread started and the last one finished: the main thread may not
    // run at all while 32 workers do, so only the workers' own clocks are trusted.
    let base = Instant::now();
    let first_start = AtomicU64::new(u64::MAX);
    let last_end = AtomicU64::new(0);
    let cpu_nanos = AtomicU64::new(0);
    let nanos = |at: Instant| at.duration_since(base).as_nanos() as u64;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..w.depth)
            .map(|_| {
                let mut buf = template.clone();
                let (file, next, done, barrier) = (&file, &next, &done, &barrier);
                let (first_start, last_end, cpu_nanos) = (&first_start, &last_end, &cpu_nanos);
                scope.spawn(move || -> Result<()> {
                    barrier.wait();
                    let cpu_start = own_cpu()?;
                    let started = nanos(Instant::now());
                    let first = first_start
                        .fetch_min(started, Ordering::Relaxed)
                        .min(started);
                    let deadline = base + Duration::from_nanos(first) + PHASE;
                    let result = loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&offset) = offsets.get(i) else {
                            break Ok(());
                        };
                        if Instant::now() > deadline {
                            break Ok(());
                        }
                        if let Err(err) = direct_op(file, w.kind, &mut buf, offset) {
                            break Err(err);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    };
                    last_end.fetch_max(nanos(Instant::now()), Ordering::Relaxed);
                    let cpu = own_cpu()? - cpu_start;
                    cpu_nanos.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
                    result
                })
            })
            .collect();
        let mut result = Ok(());
        for worker in workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => result = Err(err),
                Err(_) => result = Err("a direct I/O thread panicked".into()),
            }
        }
        let elapsed = Duration::from_nanos(
            last_end.load(Ordering::Relaxed) - first_start.load(Ordering::Relaxed),
        );
        result.map(|()| Run {
            ops: done.load(Ordering::Relaxed),
            elapsed,
            cpu: Duration::from_nanos(cpu_nanos.load(Ordering::Relaxed)),
            device_cpu: Duration::ZERO,
            ring_worker_cpu: Duration::ZERO,
            kicks: 0,
            interrupts: 0,
        })
    })
}

/// The device's interrupt: counts, and signals `event` when the driver sleeps on it.
struct CountingInterrupt {
    count: AtomicU64,
    event: Option<EventFd>,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        match &self.event {
            Some(event) => event.write(1),
            None => Ok(()),
        }
    }
}

/// Waits until `fd` is readable; false after `timeout`.
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pollfd` is one valid, live pollfd for the duration of the call.
        let ret = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if ret >= 0 {
            return Ok(ret > 0);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err.into());
        }
    }
}

/// The driver half of a split virtqueue: slot `s` uses descriptors `3s..3s+3`, header `HEADERS + 16s`, status
/// `STATUSES + s` and data buffer `DATA + s MiB`.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    kick: &'a EventFd,
    next_avail: Wrapping<u16>,
    published: Wrapping<u16>,
    last_used: Wrapping<u16>,
    kicks: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, kick: &'a EventFd) -> Result<Self> {
        // Fresh rings: zero flags, indices and event fields.
        mem.write_slice(
            &vec![0u8; (HEADERS - DESC_TABLE) as usize],
            GuestAddress(DESC_TABLE),
        )?;
        Ok(Self {
            mem,
            kick,
            next_avail: Wrapping(0),
            published: Wrapping(0),
            last_used: Wrapping(0),
            kicks: 0,
        })
    }

    fn data(slot: usize) -> u64 {
        DATA + slot as u64 * LARGE
    }

    /// Writes a request into `slot` and puts it on the available ring (not yet published).
    fn submit(&mut self, slot: usize, kind: Kind, offset: u64, len: u64) -> Result<()> {
        let (request_type, data_flags) = match kind {
            Kind::Read => (VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE),
            Kind::Write => (VIRTIO_BLK_T_OUT, 0),
        };
        let data = Self::data(slot);
        if kind == Kind::Write {
            for block in 0..len / BLOCK {
                let number = offset / BLOCK + block;
                self.mem
                    .write_obj(number.to_le(), GuestAddress(data + block * BLOCK))?;
            }
        }
        let header = HEADERS + 16 * slot as u64;
        let status = STATUSES + slot as u64;
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&(offset / 512).to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(header))?;
        self.mem.write_obj(0xffu8, GuestAddress(status))?;
        let first = 3 * slot as u16;
        let descriptors = [
            Descriptor::new(header, 16, VRING_DESC_F_NEXT as u16, first + 1),
            Descriptor::new(
                data,
                len as u32,
                (data_flags | VRING_DESC_F_NEXT) as u16,
                first + 2,
            ),
            Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, desc) in descriptors.into_iter().enumerate() {
            let addr = DESC_TABLE + 16 * (u64::from(first) + i as u64);
            self.mem
                .write_obj(RawDescriptor::from(desc), GuestAddress(addr))?;
        }
        let ring_slot = u64::from(self.next_avail.0 % QUEUE_SIZE);
        self.mem
            .write_obj(first.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * ring_slot))?;
        self.next_avail += 1;
        Ok(())
    }

    /// Publishes the submitted requests and kicks the device if its `avail_event` asks for it.
    fn publish(&mut self) -> Result<()> {
        let (old, new) = (self.published, self.next_avail);
        if old == new {
            return Ok(());
        }
        self.mem.store(
            new.0.to_le(),
            GuestAddress(AVAIL_RING + 2),
            Ordering::Release,
        )?;
        self.published = new;
        // The device re-arms `avail_event` and then re-reads the index; order our index store before our read.
        fence(Ordering::SeqCst);
        let event = u16::from_le(
            self.mem
                .load(GuestAddress(USED_AVAIL_EVENT), Ordering::Relaxed)?,
        );
        if (new - Wrapping(event) - Wrapping(1)) < (new - old) {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        Ok(())
    }

    /// Whether the device has used a chain the driver has not seen.
    fn pending(&self) -> Result<bool> {
        let used = u16::from_le(
            self.mem
                .load(GuestAddress(USED_RING + 2), Ordering::Acquire)?,
        );
        Ok(used != self.last_used.0)
    }

    /// The next completion, if any: (slot, used length, status byte).
    fn poll(&mut self) -> Result<Option<(usize, u32, u8)>> {
        if !self.pending()? {
            return Ok(None);
        }
        let elem = USED_RING + 4 + 8 * u64::from(self.last_used.0 % QUEUE_SIZE);
        let id = u32::from_le(self.mem.read_obj(GuestAddress(elem))?);
        let len = u32::from_le(self.mem.read_obj(GuestAddress(elem + 4))?);
        self.last_used += 1;
        if id % 3 != 0 || id / 3 >= MAX_DEPTH as u32 {
            return Err(format!("the device returned head {id}, which no request used").into());
        }
        let slot = (id / 3) as usize;
        let status = self.mem.read_obj(GuestAddress(STATUSES + slot as u64))?;
        Ok(Some((slot, len, status)))
    }

    /// Asks for an interrupt at the next completion, as a driver re-enabling callbacks does.
    fn arm_interrupt(&self) -> Result<()> {
        self.mem.store(
            self.last_used.0.to_le(),
            GuestAddress(AVAIL_USED_EVENT),
            Ordering::Relaxed,
        )?;
        // Order the store before the caller's next look at the used index.
        fence(Ordering::SeqCst);
        Ok(())
    }
}

/// A queue in the layout [`Driver`] writes.
fn request_queue() -> Result<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE)?;
    queue.try_set_size(QUEUE_SIZE)?;
    queue.try_set_desc_table_address(GuestAddress(DESC_TABLE))?;
    queue.try_set_avail_ring_address(GuestAddress(AVAIL_RING))?;
    queue.try_set_used_ring_address(GuestAddress(USED_RING))?;
    queue.set_event_idx(true);
    queue.set_ready(true);
    Ok(queue)
}

/// The features the bench's driver accepts; VIRTIO_BLK_F_FLUSH only with a write cache.
fn driver_features(write_cache: bool) -> u64 {
    let flush = if write_cache {
        1 << VIRTIO_BLK_F_FLUSH
    } else {
        0
    };
    (1 << VIRTIO_F_VERSION_1) | flush | (1 << VIRTIO_RING_F_EVENT_IDX)
}

/// The workload through a virtio-blk device's request queue.
fn run_device(
    path: &Path,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    w: &Workload,
    offsets: &[u64],
    config: &Config,
) -> Result<Run> {
    let wait = config.wait;
    let disk = Arc::new(RawFile::open(path, false)?);
    let mut block = Block::new(
        disk,
        &BlockOptions {
            queue_size: QUEUE_SIZE,
            ..BlockOptions::default()
        },
    )?;
    block.set_io_engine(match config.engine {
        Engine::Uring => IoEngine::Auto,
        Engine::Sync => IoEngine::Sync,
    });
    let features = driver_features(config.write_cache);
    block.ack_features(features);
    if block.acked_features() != features {
        return Err("the device does not offer VERSION_1, FLUSH and EVENT_IDX".into());
    }
    let guard = mem.memory();
    let kick = EventFd::new(EFD_NONBLOCK)?;
    let mut driver = Driver::new(&guard, &kick)?;
    for slot in 0..w.depth {
        guard.write_slice(
            &vec![FILL; w.size as usize],
            GuestAddress(Driver::data(slot)),
        )?;
    }
    let irq_event = EventFd::new(EFD_NONBLOCK)?;
    let interrupt = Arc::new(CountingInterrupt {
        count: AtomicU64::new(0),
        event: match wait {
            WaitMode::Spin => None,
            WaitMode::Event => Some(irq_event.try_clone()?),
        },
    });
    block.activate(
        mem.clone(),
        interrupt.clone(),
        vec![(0, request_queue()?, kick.try_clone()?)],
    )?;

    let expected_len = match w.kind {
        Kind::Read => w.size as u32 + 1,
        Kind::Write => 1,
    };
    let device_thread = named_thread_schedstat("virtio-blk")?;
    let device_cpu_start = thread_cpu(&device_thread)?;
    let ring_workers_start = ring_worker_cpu()?;
    let cpu_start = own_cpu()?;
    let start = Instant::now();
    let mut issued = 0usize;
    let mut completed = 0usize;
    let mut in_flight = [false; MAX_DEPTH];
    let mut slot_offset = [0u64; MAX_DEPTH];
    for slot in 0..w.depth {
        let Some(&offset) = offsets.get(issued) else {
            break;
        };
        driver.submit(slot, w.kind, offset, w.size)?;
        in_flight[slot] = true;
        slot_offset[slot] = offset;
        issued += 1;
    }
    driver.arm_interrupt()?;
    driver.publish()?;
    let mut last_progress = Instant::now();
    let mut spins = 0u32;
    while completed < issued {
        let mut progressed = false;
        while let Some((slot, len, status)) = driver.poll()? {
            if !in_flight[slot] {
                return Err(format!("the device completed slot {slot} twice").into());
            }
            if status != VIRTIO_BLK_S_OK as u8 || len != expected_len {
                return Err(format!(
                    "request at byte {} completed with status {status} and length {len}",
                    slot_offset[slot]
                )
                .into());
            }
            if w.kind == Kind::Read {
                let data = Driver::data(slot);
                for at in [0, w.size - BLOCK] {
                    let found = u64::from_le(guard.read_obj(GuestAddress(data + at))?);
                    check_stamp(found, slot_offset[slot] + at)?;
                }
            }
            in_flight[slot] = false;
            completed += 1;
            progressed = true;
            if let Some(&offset) = offsets.get(issued) {
                if start.elapsed() <= PHASE {
                    driver.submit(slot, w.kind, offset, w.size)?;
                    in_flight[slot] = true;
                    slot_offset[slot] = offset;
                    issued += 1;
                }
            }
        }
        if progressed {
            driver.arm_interrupt()?;
            driver.publish()?;
            spins = 0;
            last_progress = Instant::now();
            continue;
        }
        match wait {
            WaitMode::Spin => {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(1 << 16) && last_progress.elapsed() > STALL_LIMIT {
                    return Err("the device stopped completing requests".into());
                }
            }
            WaitMode::Event => {
                // `used_event` is armed (with a fence) since the last completion, so an interrupt follows any
                // completion that is not visible yet.
                if driver.pending()? {
                    continue;
                }
                if !wait_readable(&irq_event, STALL_LIMIT)? {
                    return Err("the device stopped completing requests".into());
                }
                let _ = irq_event.read();
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu = own_cpu()? - cpu_start;
    let device_cpu = thread_cpu(&device_thread)? - device_cpu_start;
    let ring_worker_cpu = ring_worker_cpu_since(&ring_workers_start)?;
    let kicks = driver.kicks;
    drop(guard);
    if block.reset().is_none() {
        return Err("the device was not running at the end of the workload".into());
    }
    Ok(Run {
        ops: completed,
        elapsed,
        cpu,
        device_cpu,
        ring_worker_cpu,
        kicks,
        interrupts: interrupt.count.load(Ordering::Relaxed),
    })
}

/// Puts the image in the state a run starts from; returns the pages resident after an eviction.
fn prepare(path: &Path, cache: CacheMode) -> Result<usize> {
    match cache {
        CacheMode::Cold => evict(path),
        CacheMode::Warm => Ok(0),
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The 1-minute load average, as context for the numbers.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn report(w: &Workload, direct: &[Run], device: &[Run]) -> Value {
    let (unit, scale) = match w.pattern {
        Pattern::Random => ("iops", 1.0),
        Pattern::Sequential => ("mib_s", (w.size as f64) / f64::from(1u32 << 20)),
    };
    let rates = |runs: &[Run]| -> Vec<f64> {
        runs.iter()
            .map(|run| round(run.per_second() * scale, 1))
            .collect()
    };
    let (device_rates, direct_rates) = (rates(device), rates(direct));
    let (device_rate, direct_rate) = (median(&device_rates), median(&direct_rates));
    // Little's law: mean latency = depth / throughput.
    let latency_us = |ops_per_s: f64| round(w.depth as f64 * 1e6 / ops_per_s, 2);
    let mut entry = serde_json::Map::new();
    entry.insert("name".into(), json!(w.name));
    entry.insert("block_bytes".into(), json!(w.size));
    entry.insert("queue_depth".into(), json!(w.depth));
    entry.insert(format!("device_{unit}"), json!(device_rate));
    entry.insert(format!("direct_{unit}"), json!(direct_rate));
    entry.insert("ratio".into(), json!(round(device_rate / direct_rate, 3)));
    entry.insert(format!("device_{unit}_runs"), json!(device_rates));
    entry.insert(format!("direct_{unit}_runs"), json!(direct_rates));
    entry.insert(
        "device_mean_latency_us".into(),
        json!(latency_us(device_rate / scale)),
    );
    entry.insert(
        "direct_mean_latency_us".into(),
        json!(latency_us(direct_rate / scale)),
    );
    let cpu = |runs: &[Run]| -> Vec<f64> {
        runs.iter()
            .map(|run| round(run.cpu_us_per_op(), 2))
            .collect()
    };
    entry.insert("device_cpu_us_per_op".into(), json!(median(&cpu(device))));
    entry.insert("direct_cpu_us_per_op".into(), json!(median(&cpu(direct))));
    let device_thread: Vec<f64> = device
        .iter()
        .map(|run| run.device_cpu.as_secs_f64() * 1e6 / run.ops as f64)
        .collect();
    entry.insert(
        "device_thread_cpu_us_per_op".into(),
        json!(round(median(&device_thread), 2)),
    );
    let ring_workers: Vec<f64> = device
        .iter()
        .map(|run| run.ring_worker_cpu.as_secs_f64() * 1e6 / run.ops as f64)
        .collect();
    entry.insert(
        "device_ring_workers_cpu_us_per_op".into(),
        json!(round(median(&ring_workers), 2)),
    );
    let ops: usize = device.iter().map(|run| run.ops).sum();
    let per_op = |count: u64| round(count as f64 / ops as f64, 3);
    entry.insert(
        "device_kicks_per_op".into(),
        json!(per_op(device.iter().map(|run| run.kicks).sum())),
    );
    entry.insert(
        "device_interrupts_per_op".into(),
        json!(per_op(device.iter().map(|run| run.interrupts).sum())),
    );
    Value::Object(entry)
}

fn main() -> Result<()> {
    let cache = match std::env::var("ATRIUM_BLK_BENCH_CACHE").as_deref() {
        Ok("warm") => CacheMode::Warm,
        Ok("cold") | Err(_) => CacheMode::Cold,
        Ok(other) => {
            return Err(
                format!("ATRIUM_BLK_BENCH_CACHE={other} is not a mode; use cold or warm").into(),
            )
        }
    };
    let wait = match std::env::var("ATRIUM_BLK_BENCH_WAIT").as_deref() {
        Ok("spin") => WaitMode::Spin,
        Ok("event") | Err(_) => WaitMode::Event,
        Ok(other) => {
            return Err(
                format!("ATRIUM_BLK_BENCH_WAIT={other} is not a mode; use spin or event").into(),
            )
        }
    };
    let engine = match std::env::var("ATRIUM_BLK_BENCH_ENGINE").as_deref() {
        Ok("uring") | Err(_) => Engine::Uring,
        Ok("sync") => Engine::Sync,
        Ok(other) => {
            return Err(format!(
                "ATRIUM_BLK_BENCH_ENGINE={other} is not an engine; use uring or sync"
            )
            .into())
        }
    };
    let write_cache = match std::env::var("ATRIUM_BLK_BENCH_WRITE_CACHE").as_deref() {
        Ok("on") | Err(_) => true,
        Ok("off") => false,
        Ok(other) => {
            return Err(format!(
                "ATRIUM_BLK_BENCH_WRITE_CACHE={other} is not a setting; use on or off"
            )
            .into())
        }
    };
    let config = Config {
        cache,
        wait,
        engine,
        write_cache,
    };
    let only = std::env::var("ATRIUM_BLK_BENCH_ONLY").unwrap_or_default();
    let load_before = load_average();
    let scratch = ScratchDir::new()?;
    let image = scratch.0.join("disk.raw");
    let started = Instant::now();
    create_image(&image)?;
    let create_s = started.elapsed().as_secs_f64();
    if cache == CacheMode::Warm {
        preload(&image)?;
    }
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(
        GuestAddress(0),
        MEM_SIZE,
    )])?);

    let mut results = Vec::new();
    let mut max_resident = 0usize;
    for w in WORKLOADS.iter().filter(|w| w.name.contains(&only)) {
        let offsets = w.offsets();
        let (mut direct, mut device) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Alternate which path goes first, so neither always inherits the other's effects on the host.
            for device_turn in [round % 2 == 1, round % 2 == 0] {
                max_resident = max_resident.max(prepare(&image, config.cache)?);
                if device_turn {
                    device.push(run_device(&image, &mem, w, &offsets, &config)?);
                } else {
                    direct.push(run_direct(&image, w, &offsets, &config)?);
                }
            }
        }
        results.push(report(w, &direct, &device));
    }

    let cache_note = match cache {
        CacheMode::Cold => {
            "cold: buffered I/O on both paths; before every run the image is synced and evicted (POSIX_FADV_DONTNEED, drop_caches fallback)"
        }
        CacheMode::Warm => {
            "warm: buffered I/O on both paths; the image is read into the page cache once and stays there"
        }
    };
    let wait_note = match wait {
        WaitMode::Spin => "driver thread spins on the used index; the interrupt only counts",
        WaitMode::Event => "driver thread sleeps on an eventfd the interrupt signals",
    };
    let engine_note = match engine {
        Engine::Uring => "io_uring (falls back to synchronous I/O if the kernel refuses it)",
        Engine::Sync => "synchronous, one request at a time",
    };
    let (driver_features, durability) = if write_cache {
        (
            json!(["VERSION_1", "BLK_F_FLUSH", "RING_F_EVENT_IDX"]),
            "write cache on both paths: no sync per write",
        )
    } else {
        (
            json!(["VERSION_1", "RING_F_EVENT_IDX"]),
            "durable writes on both paths: device write-through, direct path O_DSYNC",
        )
    };
    let out = json!({
        "settings": {
            "image_bytes": FILE_SIZE,
            "image_location": "cargo target dir (same file system as the build)",
            "cache": cache_note,
            "max_resident_pages_after_evict": max_resident,
            "guest_memory_bytes": MEM_SIZE,
            "queue_size": QUEUE_SIZE,
            "driver_features": driver_features,
            "durability": durability,
            "device_engine": engine_note,
            "device_wait": wait_note,
            "direct_qd32": "32 threads doing pread/pwrite",
            "phase_ms": PHASE.as_millis(),
            "rounds": ROUNDS,
            "reported": "median over rounds; ratio = device / direct; cpu_us_per_op = CPU time of every thread involved (device path: driver, device and io_uring worker threads) per operation, from /proc schedstat",
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "image_create_s": round(create_s, 2),
            "total_s": round(started.elapsed().as_secs_f64(), 1),
        },
        "workloads": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
