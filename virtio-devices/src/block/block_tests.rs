use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::device::GuestMemoryMmap;
use crate::test_utils::{desc, guest_memory, next_report, RecordingInterrupt, Reported, MEM_SIZE};
use crate::worker::{process_queue_to_completion, ChainHandler};
use crate::VirtioInterruptType;

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SIZE: usize = 64 * 1024;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8 + 1).collect()
}

/// A raw image full of non-zero bytes.
fn image() -> TempFile {
    let file = TempFile::new().unwrap();
    file.as_file().write_all(&pattern(DISK_SIZE)).unwrap();
    file
}

fn host_bytes(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}

/// Counts flushes on top of a raw file.
struct CountingDisk {
    inner: RawFile,
    flushes: AtomicUsize,
}

impl DiskBackend for CountingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn direct_fd(&self) -> Option<std::os::unix::io::BorrowedFd<'_>> {
        self.inner.direct_fd()
    }
    fn read_to_guest(
        &self,
        buf: &vm_memory::VolatileSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        self.inner.read_to_guest(buf, offset, scratch)
    }
    fn write_from_guest(
        &self,
        buf: &vm_memory::VolatileSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        self.inner.write_from_guest(buf, offset, scratch)
    }
}

/// A raw file behind only the required [`DiskBackend`] methods, so data moves through the default bouncing
/// `read_to_guest`/`write_from_guest`. Records the largest single read or write.
struct BouncingDisk {
    inner: RawFile,
    largest: AtomicUsize,
}

impl DiskBackend for BouncingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.largest.fetch_max(buf.len(), Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.largest.fetch_max(buf.len(), Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// Both ways a handler moves data.
pub(super) const ENGINES: [IoEngine; 2] = [IoEngine::Sync, IoEngine::Auto];

/// A handler serving `ctx` the `engine` way, with room for `entries` requests in flight on the io_uring path. `None`
/// when io_uring is not available here: the test then covers the synchronous path only.
pub(super) fn handler_for(
    engine: IoEngine,
    ctx: BlockContext,
    mem: &GuestMemory,
    entries: u32,
) -> Option<BlockHandler> {
    let handler = match engine {
        IoEngine::Sync => BlockHandler::new(ctx),
        IoEngine::Auto => {
            match AsyncIo::new(&ctx.disk, mem.clone(), entries) {
                Ok(Some(io)) => BlockHandler::with_async_io(ctx, io),
                Ok(None) => panic!("the test disk has no direct descriptor"),
                Err(err) if uring::unavailable(&err) => {
                    eprintln!("io_uring is not available here ({err}); only the synchronous path is tested");
                    return None;
                }
                Err(err) => panic!("setting up io_uring failed: {err}"),
            }
        }
    };
    assert_eq!(handler.is_async(), engine == IoEngine::Auto);
    Some(handler)
}

/// The device context tests use.
pub(super) fn context(
    disk: Arc<dyn DiskBackend>,
    read_only: bool,
    writeback: bool,
) -> BlockContext {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..11].copy_from_slice(b"atrium-disk");
    BlockContext {
        disk,
        read_only,
        writeback,
        serial,
        discard: range_limits(),
        write_zeroes: range_limits(),
        counters: Arc::default(),
    }
}

struct Setup {
    image: TempFile,
    disk: Arc<CountingDisk>,
    handler: BlockHandler,
    mem: GuestMemory,
    counters: Arc<crate::counters::BlockCounters>,
}

fn setup_on(engine: IoEngine, read_only: bool, writeback: bool) -> Option<Setup> {
    let image = image();
    let disk = Arc::new(CountingDisk {
        inner: RawFile::open(image.as_path(), read_only).unwrap(),
        flushes: AtomicUsize::new(0),
    });
    let mem = guest_memory();
    let ctx = context(disk.clone(), read_only, writeback);
    let counters = ctx.counters.clone();
    let handler = handler_for(engine, ctx, &mem, 16)?;
    Some(Setup {
        image,
        disk,
        handler,
        mem,
        counters,
    })
}

/// One setup per engine available here.
fn setups_with(read_only: bool, writeback: bool) -> Vec<Setup> {
    ENGINES
        .iter()
        .filter_map(|&engine| setup_on(engine, read_only, writeback))
        .collect()
}

fn setups() -> Vec<Setup> {
    setups_with(false, true)
}

impl Setup {
    fn path(&self) -> &Path {
        self.image.as_path()
    }

    /// Durability operations so far: backend flushes, plus flushes and durable writes sent through io_uring.
    fn syncs(&self) -> u64 {
        self.disk.flushes.load(Ordering::Relaxed) as u64 + self.handler.ring_syncs()
    }

    fn header(&self, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .memory()
            .write_slice(&header, GuestAddress(HEADER))
            .unwrap();
    }

    /// Serves one chain; returns (status byte, used length).
    fn run(&mut self, descs: &[RawDescriptor]) -> (u8, u32) {
        let guard = self.mem.memory();
        guard.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(&*guard, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        process_queue_to_completion(&mut self.handler, 0, &mut queue, &guard).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        let status = guard.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        (status, vq.used().ring().ref_at(0).unwrap().load().len())
    }

    /// A request with a header, one data buffer and a status byte.
    fn request(&mut self, request_type: u32, sector: u64, len: u32, writable: bool) -> (u8, u32) {
        self.header(request_type, sector);
        self.run(&[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, len, writable, Some(2)),
            desc(STATUS, 1, true, None),
        ])
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        bytes
    }

    fn put_guest(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    /// Writes (sector, num_sectors, flags) ranges at `DATA`.
    fn ranges(&self, ranges: &[(u64, u32, u32)]) -> u32 {
        let mut list = Vec::new();
        for (sector, count, flags) in ranges {
            list.extend_from_slice(&sector.to_le_bytes());
            list.extend_from_slice(&count.to_le_bytes());
            list.extend_from_slice(&flags.to_le_bytes());
        }
        self.put_guest(DATA, &list);
        list.len() as u32
    }
}

#[test]
fn reads_copy_sectors_into_guest_buffers() {
    for mut s in setups() {
        assert_eq!(s.request(VIRTIO_BLK_T_IN, 2, 1024, true), (OK, 1025));
        assert_eq!(s.guest(DATA, 1024), pattern(DISK_SIZE)[1024..2048]);
        // Scattered over two buffers.
        s.header(VIRTIO_BLK_T_IN, 0);
        let (status, len) = s.run(&[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 512, true, Some(2)),
            desc(DATA + 0x10000, 512, true, Some(3)),
            desc(STATUS, 1, true, None),
        ]);
        assert_eq!((status, len), (OK, 1025));
        assert_eq!(s.guest(DATA + 0x10000, 512), pattern(DISK_SIZE)[512..1024]);
    }
}

#[test]
fn writes_reach_the_file() {
    for mut s in setups() {
        let data: Vec<u8> = (0..1536).map(|i| (i % 13) as u8).collect();
        s.put_guest(DATA, &data);
        assert_eq!(s.request(VIRTIO_BLK_T_OUT, 4, 1536, false), (OK, 1));
        assert_eq!(host_bytes(s.path(), 2048, 1536), data);
        // Untouched around it.
        assert_eq!(host_bytes(s.path(), 0, 2048), pattern(DISK_SIZE)[..2048]);
        assert_eq!(
            host_bytes(s.path(), 3584, 512),
            pattern(DISK_SIZE)[3584..4096]
        );
        // With a negotiated write cache, writes wait for an explicit flush.
        assert_eq!(s.syncs(), 0);
        assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false), (OK, 1));
        assert_eq!(s.syncs(), 1);
    }
}

#[test]
fn without_flush_negotiated_writes_are_write_through() {
    for mut s in setups_with(false, false) {
        s.put_guest(DATA, &[0x5a; 512]);
        assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, 512, false), (OK, 1));
        assert_eq!(s.syncs(), 1);
        let len = s.ranges(&[(8, 8, 0)]);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (OK, 1));
        assert_eq!(s.syncs(), 2);
    }
}

#[test]
fn get_id_returns_the_padded_serial() {
    for mut s in setups() {
        s.put_guest(DATA, &[0xff; 32]);
        assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, 32, true), (OK, 21));
        let mut expected = b"atrium-disk".to_vec();
        expected.resize(20, 0);
        assert_eq!(s.guest(DATA, 20), expected);
        assert_eq!(s.guest(DATA + 20, 12), vec![0xff; 12]);
        // A short buffer gets what fits.
        assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, 6, true), (OK, 7));
    }
}

#[test]
fn discard_and_write_zeroes_zero_the_ranges() {
    for mut s in setups() {
        let len = s.ranges(&[(8, 8, 0), (32, 2, 0)]);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (OK, 1));
        let host = std::fs::read(s.path()).unwrap();
        assert_eq!(host.len(), DISK_SIZE, "discard keeps the size");
        assert!(host[4096..8192].iter().all(|byte| *byte == 0));
        assert!(host[16384..17408].iter().all(|byte| *byte == 0));
        assert_eq!(host[..4096], pattern(DISK_SIZE)[..4096]);
        assert_eq!(host[8192..16384], pattern(DISK_SIZE)[8192..16384]);

        for (sector, unmap) in [(40u64, 0u32), (48, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)] {
            let len = s.ranges(&[(sector, 3, unmap)]);
            assert_eq!(s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, len, false), (OK, 1));
            let start = sector as usize * 512;
            let host = host_bytes(s.path(), start - 512, 2048);
            assert_eq!(host[..512], pattern(DISK_SIZE)[start - 512..start]);
            assert!(
                host[512..2048].iter().all(|byte| *byte == 0),
                "sector {sector}"
            );
        }
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), DISK_SIZE as u64);
    }
}

#[test]
fn bad_range_lists_are_refused_before_anything_changes() {
    for mut s in setups() {
        // The unmap flag is reserved for discard; unknown flags for both.
        let len = s.ranges(&[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (UNSUPP, 1));
        let len = s.ranges(&[(0, 1, 0x4)]);
        assert_eq!(
            s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, len, false),
            (UNSUPP, 1)
        );
        // A valid range followed by one past the end: neither is applied.
        let capacity = (DISK_SIZE / 512) as u64;
        let len = s.ranges(&[(0, 1, 0), (capacity - 1, 2, 0)]);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (IOERR, 1));
        let len = s.ranges(&[(u64::MAX / 256, 1, 0)]);
        assert_eq!(
            s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, len, false),
            (IOERR, 1)
        );
        assert_eq!(std::fs::read(s.path()).unwrap(), pattern(DISK_SIZE));
        // Too many ranges.
        let many: Vec<(u64, u32, u32)> = (0..33).map(|i| (i, 1, 0)).collect();
        let len = s.ranges(&many);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (IOERR, 1));
        assert_eq!(std::fs::read(s.path()).unwrap(), pattern(DISK_SIZE));
    }
}

#[test]
fn read_only_disks_fail_every_write() {
    for mut s in setups_with(true, true) {
        s.put_guest(DATA, &[0; 512]);
        assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, 512, false), (IOERR, 1));
        let len = s.ranges(&[(0, 8, 0)]);
        assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (IOERR, 1));
        assert_eq!(
            s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, len, false),
            (IOERR, 1)
        );
        assert_eq!(std::fs::read(s.path()).unwrap(), pattern(DISK_SIZE));
        // Reads and flushes still work.
        assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, 512, true), (OK, 513));
        assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false), (OK, 1));
    }
}

#[test]
fn requests_past_the_capacity_fail() {
    for mut s in setups() {
        let last = (DISK_SIZE / 512) as u64 - 1;
        assert_eq!(s.request(VIRTIO_BLK_T_IN, last, 512, true), (OK, 513));
        assert_eq!(s.request(VIRTIO_BLK_T_IN, last, 1024, true), (IOERR, 1));
        assert_eq!(
            s.request(VIRTIO_BLK_T_OUT, last + 1, 512, false),
            (IOERR, 1)
        );
        assert_eq!(
            s.request(VIRTIO_BLK_T_IN, u64::MAX / 512, 512, true),
            (IOERR, 1)
        );
        assert_eq!(std::fs::read(s.path()).unwrap(), pattern(DISK_SIZE));
    }
}

#[test]
fn unknown_requests_are_unsupported() {
    for mut s in setups() {
        assert_eq!(s.request(2, 0, 512, true), (UNSUPP, 1));
        assert_eq!(s.request(0xdead_beef, 0, 512, false), (UNSUPP, 1));
    }
}

#[test]
fn counters_follow_every_request_on_both_engines() {
    use crate::counters::DeviceCounters;

    for with_cache in [true, false] {
        for mut s in setups_with(false, with_cache) {
            assert_eq!(s.request(VIRTIO_BLK_T_IN, 2, 1024, true), (OK, 1025));
            assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, 512, true), (OK, 513));
            assert_eq!(s.request(VIRTIO_BLK_T_OUT, 4, 1536, false), (OK, 1));
            assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false), (OK, 1));
            assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, 20, true), (OK, 21));
            let len = s.ranges(&[(8, 8, 0)]);
            assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, len, false), (OK, 1));
            assert_eq!(s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, len, false), (OK, 1));
            // Failures of every kind: past the end (read and write), an unknown type, a chain without a status.
            let end = (DISK_SIZE / 512) as u64;
            assert_eq!(s.request(VIRTIO_BLK_T_IN, end, 512, true), (IOERR, 1));
            assert_eq!(s.request(VIRTIO_BLK_T_OUT, end, 512, false), (IOERR, 1));
            assert_eq!(s.request(2, 0, 512, true), (UNSUPP, 1));
            s.header(VIRTIO_BLK_T_IN, 0);
            let no_status = [
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, false, None),
            ];
            assert_eq!(s.run(&no_status), (0xee, 0));
            assert_eq!(
                s.counters.snapshot(),
                [
                    ("read_bytes", 1536),
                    ("write_bytes", 1536),
                    ("read_ops", 2),
                    ("write_ops", 1),
                    ("flush_ops", 1),
                    ("discard_ops", 1),
                    ("write_zeroes_ops", 1),
                    ("errors", 4),
                ],
                "write cache {with_cache}, async {}",
                s.handler.is_async()
            );
        }
    }
}

#[test]
fn malformed_chains_get_an_error_status_or_nothing() {
    for mut s in setups() {
        s.header(VIRTIO_BLK_T_IN, 0);
        // No status descriptor: nothing can be reported.
        assert_eq!(
            s.run(&[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, false, None)
            ]),
            (0xee, 0)
        );
        // A driver-readable status.
        assert_eq!(
            s.run(&[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, true, Some(2)),
                desc(STATUS, 1, false, None)
            ]),
            (0xee, 0)
        );
        // A looping chain.
        assert_eq!(
            s.run(&[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 1, true, Some(0))
            ]),
            (0xee, 0)
        );
        // A header that is too short: the status is known, so IOERR.
        assert_eq!(
            s.run(&[
                desc(HEADER, 15, false, Some(1)),
                desc(STATUS, 1, true, None)
            ]),
            (IOERR, 1)
        );
        // Data outside guest memory.
        assert_eq!(
            s.run(&[
                desc(HEADER, 16, false, Some(1)),
                desc(0x4000_0000, 512, true, Some(2)),
                desc(STATUS, 1, true, None)
            ]),
            (IOERR, 1)
        );
    }
}

#[test]
fn config_space_describes_the_disk() {
    let image = image();
    let disk = Arc::new(RawFile::open(image.as_path(), false).unwrap());
    let options = BlockOptions {
        serial: "s".into(),
        num_queues: 4,
        queue_size: 128,
    };
    let block = Block::new(disk, &options).unwrap();
    let read = |offset: usize, len: usize| {
        let mut bytes = [0u8; 8];
        block.read_config(offset as u64, &mut bytes[..len]);
        u64::from_le_bytes(bytes)
    };
    assert_eq!(read(offset_of!(virtio_blk_config, capacity), 8), 128);
    assert_eq!(read(offset_of!(virtio_blk_config, seg_max), 4), 126);
    assert_eq!(read(offset_of!(virtio_blk_config, blk_size), 4), 512);
    assert_eq!(read(offset_of!(virtio_blk_config, num_queues), 2), 4);
    assert_eq!(read(offset_of!(virtio_blk_config, max_discard_seg), 4), 32);
    assert_eq!(
        read(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 1),
        1
    );
    // Past the end reads zero.
    assert_eq!(read(0x1000, 4), 0);
    assert_eq!(block.capacity(), 128);
    assert_eq!(block.queue_max_sizes(), &[128; 4]);
    let features = block.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & COMMON_FEATURES, COMMON_FEATURES);
}

#[test]
fn read_only_disks_offer_ro_and_no_discard() {
    let image = image();
    let disk = Arc::new(RawFile::open(image.as_path(), true).unwrap());
    let block = Block::new(disk, &BlockOptions::default()).unwrap();
    let features = block.features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn invalid_options_are_refused() {
    let image = image();
    let disk: Arc<dyn DiskBackend> = Arc::new(RawFile::open(image.as_path(), true).unwrap());
    let build = |options: BlockOptions| Block::new(disk.clone(), &options).map(|_| ());
    let defaults = BlockOptions::default;
    assert!(matches!(
        build(BlockOptions {
            serial: "x".repeat(21),
            ..defaults()
        }),
        Err(BlockError::SerialTooLong(_))
    ));
    assert!(build(BlockOptions {
        serial: "x".repeat(20),
        ..defaults()
    })
    .is_ok());
    assert!(matches!(
        build(BlockOptions {
            num_queues: 0,
            ..defaults()
        }),
        Err(BlockError::QueueCount(0))
    ));
    assert!(matches!(
        build(BlockOptions {
            num_queues: 256,
            ..defaults()
        }),
        Err(BlockError::QueueCount(256))
    ));
    for size in [0, 2, 100, 65535] {
        assert!(matches!(
            build(BlockOptions {
                queue_size: size,
                ..defaults()
            }),
            Err(BlockError::QueueSize(_))
        ));
    }
    let tiny = TempFile::new().unwrap();
    tiny.as_file().write_all(&[1; 511]).unwrap();
    let disk = Arc::new(RawFile::open(tiny.as_path(), false).unwrap());
    assert!(matches!(
        Block::new(disk, &defaults()),
        Err(BlockError::DiskTooSmall)
    ));
}

#[test]
fn an_image_in_use_read_write_cannot_be_opened_again() {
    let image = image();
    let first = RawFile::open(image.as_path(), false).unwrap();
    let err = RawFile::open(image.as_path(), false).unwrap_err();
    assert!(matches!(err, DiskError::Locked { .. }));
    let message = err.to_string();
    assert!(
        message.contains(&image.as_path().display().to_string()),
        "{message}"
    );
    assert!(matches!(
        RawFile::open(image.as_path(), true),
        Err(DiskError::Locked { .. })
    ));
    drop(first);
    // Readers share; a writer is kept out while they hold it.
    let reader = RawFile::open(image.as_path(), true).unwrap();
    let second_reader = RawFile::open(image.as_path(), true).unwrap();
    assert!(matches!(
        RawFile::open(image.as_path(), false),
        Err(DiskError::Locked { .. })
    ));
    drop((reader, second_reader));
    RawFile::open(image.as_path(), false).unwrap();
    assert!(matches!(
        RawFile::open(Path::new("/nonexistent/disk.img"), false),
        Err(DiskError::Open { .. })
    ));
}

#[test]
fn the_device_serves_its_queues_on_a_thread() {
    for engine in ENGINES {
        let image = image();
        let disk = Arc::new(RawFile::open(image.as_path(), false).unwrap());
        let mut block = Block::new(
            disk,
            &BlockOptions {
                num_queues: 2,
                ..BlockOptions::default()
            },
        )
        .unwrap();
        block.set_io_engine(engine);
        block.ack_features(block.features() | (1 << 63));
        assert_eq!(block.acked_features(), block.features());
        let mem = guest_memory();
        let guard = mem.memory();
        let vq: MockSplitQueue<'_, GuestMemoryMmap> =
            MockSplitQueue::create(&*guard, GuestAddress(0x8000), 16);
        let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let doorbell = event.try_clone().unwrap();
        let (interrupt, rx) = RecordingInterrupt::new();
        assert!(matches!(
            block.activate(
                mem.clone(),
                Arc::new(RecordingInterrupt::new().0),
                Vec::new()
            ),
            Err(ActivateError::BadQueues(_))
        ));
        block
            .activate(
                mem.clone(),
                Arc::new(interrupt),
                vec![(1, vq.create_queue().unwrap(), event)],
            )
            .unwrap();
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        guard.write_slice(&header, GuestAddress(HEADER)).unwrap();
        vq.add_desc_chains(
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, true, Some(2)),
                desc(STATUS, 1, true, None),
            ],
            0,
        )
        .unwrap();
        doorbell.write(1).unwrap();
        assert_eq!(
            next_report(&rx),
            Reported::Interrupt(VirtioInterruptType::Queue(1))
        );
        assert_eq!(guard.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        let mut data = [0u8; 512];
        guard.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data[..], pattern(DISK_SIZE)[..512]);
        let counters = block.counters().unwrap();
        let after_one_read = [
            ("read_bytes", 512),
            ("write_bytes", 0),
            ("read_ops", 1),
            ("write_ops", 0),
        ];
        assert_eq!(counters.snapshot()[..4], after_one_read);
        let events = block.reset().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, 1);
        // The counters cover the device's life, not one activation.
        assert_eq!(counters.snapshot()[..4], after_one_read);
        assert_eq!(block.counters().unwrap().snapshot()[..4], after_one_read);
    }
}

#[test]
fn hostile_chains_never_panic_or_escape_the_disk() {
    use crate::test_utils::{hostile_queue, XorShift};

    for mut s in setups() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut answered = 0;
        let mut served_data = 0;
        for _ in 0..3000 {
            let guard = s.mem.memory();
            // A random request header where most buffers point.
            let wild = rng.next() as u32;
            let request_type = rng.pick(&[
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES,
                wild,
            ]);
            let mut header = [0u8; 32];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..16].copy_from_slice(&(rng.next() % 256).to_le_bytes());
            header[16..].copy_from_slice(&rng.next().to_le_bytes().repeat(2));
            for base in (0x10_0000..0x10_4000).step_by(0x200) {
                guard.write_slice(&header, GuestAddress(base)).unwrap();
            }
            let vq = MockSplitQueue::new(&*guard, 16);
            if rng.next().is_multiple_of(2) {
                hostile_queue(&vq, &mut rng);
            } else {
                // A well-formed request with one field bent.
                let writable_data = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
                let mut descs = [
                    (0x10_0000u64, 16u32, false),
                    (0x10_1000, 512 * (1 + rng.next() % 8) as u32, writable_data),
                    (0x10_3f00, 1, true),
                ];
                let victim = (rng.next() % 3) as usize;
                let wild_addr = rng.next();
                match rng.next() % 4 {
                    0 => descs[victim].0 = rng.pick(&[wild_addr, MEM_SIZE as u64 - 1, 0x10_3ff0]),
                    1 => descs[victim].1 = rng.pick(&[0, 1, 15, 511, 4096, u32::MAX]),
                    2 => descs[victim].2 = !descs[victim].2,
                    _ => {}
                }
                let chain: Vec<RawDescriptor> = descs
                    .iter()
                    .enumerate()
                    .map(|(i, (addr, len, writable))| {
                        desc(*addr, *len, *writable, (i < 2).then_some(i as u16 + 1))
                    })
                    .collect();
                vq.add_desc_chains(&chain, 0).unwrap();
            }
            let mut queue: Queue = vq.create_queue().unwrap();
            if process_queue_to_completion(&mut s.handler, 0, &mut queue, &guard).is_ok() {
                answered += 1;
                let used = vq.used().ring().ref_at(0).unwrap().load();
                if used.len() > 1 {
                    served_data += 1;
                }
            } else {
                // A corrupt queue: the device would stop it; end what the rest of it started.
                s.handler.quiesce();
            }
            assert_eq!(s.handler.in_flight(), 0);
        }
        // Most rounds were served rather than rejected as corrupt queues.
        assert!(answered > 2000, "{answered}");
        // Plenty of reads and GET_IDs went through.
        assert!(served_data > 100, "{served_data}");
        // The image never grew past its size.
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), DISK_SIZE as u64);
    }
}

/// Guest RAM as two adjacent regions meeting at `SPLIT`, so one guest buffer can span both host mappings.
const SPLIT: u64 = 0x30_0000;

fn split_guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), SPLIT as usize),
        (GuestAddress(SPLIT), SPLIT as usize),
    ])
    .unwrap()
}

/// Serves one header/data/status request on `mem`; returns (status, used length).
fn serve(
    handler: &mut BlockHandler,
    mem: &GuestMemoryMmap,
    request_type: u32,
    sector: u64,
    data: (u64, u32),
) -> (u8, u32) {
    const STATUS_AT: u64 = 0x50_0000;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(STATUS_AT)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    vq.add_desc_chains(
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(data.0, data.1, request_type == VIRTIO_BLK_T_IN, Some(2)),
            desc(STATUS_AT, 1, true, None),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    process_queue_to_completion(handler, 0, &mut queue, mem).unwrap();
    let status = mem.read_obj::<u8>(GuestAddress(STATUS_AT)).unwrap();
    (status, vq.used().ring().ref_at(0).unwrap().load().len())
}

#[test]
fn large_buffers_spanning_memory_regions_move_on_both_data_paths() {
    // More than one bounce chunk, starting 8 KiB before the region boundary.
    let len = super::backend::BOUNCE_CHUNK + 3 * 4096;
    let addr = SPLIT - 0x2000;
    let disk_size = 4 << 20;
    for (bouncing, engine) in [
        (false, IoEngine::Sync),
        (false, IoEngine::Auto),
        (true, IoEngine::Sync),
    ] {
        let image = TempFile::new().unwrap();
        image.as_file().write_all(&pattern(disk_size)).unwrap();
        let bouncer = bouncing.then(|| {
            Arc::new(BouncingDisk {
                inner: RawFile::open(image.as_path(), false).unwrap(),
                largest: AtomicUsize::new(0),
            })
        });
        let disk: Arc<dyn DiskBackend> = match &bouncer {
            Some(bouncer) => bouncer.clone(),
            None => Arc::new(RawFile::open(image.as_path(), false).unwrap()),
        };
        let memory = GuestMemoryAtomic::new(split_guest_memory());
        let Some(mut handler) = handler_for(engine, context(disk, false, true), &memory, 16) else {
            continue;
        };
        let mem = memory.memory();

        // Read 3 sectors in: the guest buffer gets the disk bytes on both sides of the boundary.
        mem.write_slice(&vec![0u8; len], GuestAddress(addr))
            .unwrap();
        let reply = serve(&mut handler, &mem, VIRTIO_BLK_T_IN, 3, (addr, len as u32));
        assert_eq!(reply, (OK, len as u32 + 1), "{bouncing} {engine:?}");
        let mut back = vec![0u8; len];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert!(back == pattern(disk_size)[1536..1536 + len]);

        // Write a new pattern from the same buffer to sector 8.
        let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        mem.write_slice(&data, GuestAddress(addr)).unwrap();
        let reply = serve(&mut handler, &mem, VIRTIO_BLK_T_OUT, 8, (addr, len as u32));
        assert_eq!(reply, (OK, 1), "{bouncing} {engine:?}");
        let host = std::fs::read(image.as_path()).unwrap();
        assert!(host[4096..4096 + len] == data[..]);
        assert!(host[..4096] == pattern(disk_size)[..4096]);
        assert!(host[4096 + len..] == pattern(disk_size)[4096 + len..]);

        if let Some(bouncer) = bouncer {
            assert_eq!(
                bouncer.largest.load(Ordering::Relaxed),
                super::backend::BOUNCE_CHUNK,
                "the default methods move at most one chunk at a time"
            );
        }
    }
}

#[test]
fn raw_files_read_into_and_write_from_guest_memory() {
    let image = image();
    let disk = RawFile::open(image.as_path(), false).unwrap();
    let mem = split_guest_memory();
    let mut scratch = Vec::new();
    let slice = mem.get_slice(GuestAddress(DATA), 4096).unwrap();
    disk.read_to_guest(&slice, 8192, &mut scratch).unwrap();
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == pattern(DISK_SIZE)[8192..12288]);

    let data = vec![0x42u8; 4096];
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    disk.write_from_guest(&slice, 512, &mut scratch).unwrap();
    assert_eq!(host_bytes(image.as_path(), 512, 4096), data);
    assert!(scratch.is_empty(), "raw files need no scratch buffer");

    // Reading past the end of the file fails rather than leaving the tail of the buffer stale.
    let err = disk
        .read_to_guest(&slice, DISK_SIZE as u64 - 1024, &mut scratch)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    let err = disk
        .read_to_guest(&slice, u64::MAX - 100, &mut scratch)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}
