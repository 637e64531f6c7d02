use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;

use vmm_sys_util::tempfile::TempFile;

use super::*;

const FILE_SIZE: usize = 4 << 20;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A file of `FILE_SIZE` pattern bytes, opened read-write.
fn file() -> (TempFile, std::fs::File) {
    let temp = TempFile::new().unwrap();
    temp.as_file().write_all(&pattern(FILE_SIZE)).unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(temp.as_path())
        .unwrap();
    (temp, file)
}

/// A ring, or `None` (after saying so) where the kernel offers no io_uring.
fn ring<T>(fd: RawFd, entries: u32) -> Option<Uring<T>> {
    match Uring::new(fd, entries) {
        Ok(ring) => Some(ring),
        Err(err) if unavailable(&err) => {
            eprintln!("io_uring is not available here ({err}); skipping");
            None
        }
        Err(err) => panic!("setting up io_uring failed: {err}"),
    }
}

/// Vectors covering `buf` in pieces of `piece` bytes.
fn vecs(buf: &mut [u8], piece: usize) -> IoVecs {
    let mut vecs = IoVecs::default();
    for chunk in buf.chunks_mut(piece) {
        vecs.push(chunk.as_mut_ptr(), chunk.len());
    }
    vecs
}

/// Blocks until `ring`'s eventfd fires (completions are posted before it is signalled).
fn wait<T>(ring: &Uring<T>) {
    let mut pollfd = libc::pollfd {
        fd: ring.event().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive for the call.
    let ret = unsafe { libc::poll(&mut pollfd, 1, -1) };
    assert!(ret >= 0, "{}", io::Error::last_os_error());
    let _ = ring.event().read();
}

/// Polls until nothing is in flight; returns (token, outcome) in completion order.
fn drain<T>(ring: &mut Uring<T>) -> Vec<(T, io::Result<()>)> {
    let mut done = Vec::new();
    loop {
        ring.poll(|token, result| done.push((token, result)));
        if ring.in_flight() == 0 {
            return done;
        }
        wait(ring);
    }
}

#[test]
fn reads_and_writes_finish_with_their_tokens() {
    let (temp, file) = file();
    let Some(mut ring) = ring::<usize>(file.as_raw_fd(), 16) else {
        return;
    };
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 8192]).collect();
    let fresh: Vec<u8> = (0..8192).map(|i| (i % 7) as u8 + 1).collect();
    let mut write_buf = fresh.clone();
    for (token, buf) in bufs.iter_mut().enumerate() {
        let vecs = vecs(buf, 4096);
        // SAFETY: `bufs` outlives the ring's requests: `drain` below waits for all of them.
        unsafe { ring.push(IoKind::Read, token as u64 * 65536, vecs, token) }.unwrap();
    }
    let vecs = vecs(&mut write_buf, 1000);
    // SAFETY: as above.
    unsafe { ring.push(IoKind::Write { durable: true }, 1 << 20, vecs, 100) }.unwrap();
    assert_eq!(ring.in_flight(), 9);
    let done = drain(&mut ring);
    let mut tokens: Vec<usize> = done
        .iter()
        .map(|(token, result)| {
            assert!(result.is_ok(), "{result:?}");
            *token
        })
        .collect();
    tokens.sort_unstable();
    assert_eq!(tokens, [0, 1, 2, 3, 4, 5, 6, 7, 100]);
    let expected = pattern(FILE_SIZE);
    for (token, buf) in bufs.iter().enumerate() {
        assert!(buf[..] == expected[token * 65536..token * 65536 + 8192]);
    }
    let host = std::fs::read(temp.as_path()).unwrap();
    assert!(host[1 << 20..(1 << 20) + 8192] == fresh[..]);
    assert_eq!((ring.counts.writes, ring.counts.range_syncs), (1, 1));
}

#[test]
fn a_request_with_more_vectors_than_the_kernel_takes_goes_out_in_parts() {
    let (_temp, file) = file();
    let Some(mut ring) = ring::<()>(file.as_raw_fd(), 4) else {
        return;
    };
    // 2,500 vectors: three submissions of at most 1,024.
    let mut buf = vec![0u8; 2500 * 512];
    let vecs = vecs(&mut buf, 512);
    // SAFETY: `buf` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Read, 4096, vecs, ()) }.unwrap();
    let done = drain(&mut ring);
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok());
    assert!(buf[..] == pattern(FILE_SIZE)[4096..4096 + buf.len()]);
    assert!(ring.counts.resubmitted >= 2, "{:?}", ring.counts);
}

#[test]
fn a_read_past_the_end_of_the_file_fails() {
    let (_temp, file) = file();
    let Some(mut ring) = ring::<()>(file.as_raw_fd(), 4) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    let vecs = vecs(&mut buf, 4096);
    // SAFETY: `buf` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Read, FILE_SIZE as u64 - 1024, vecs, ()) }.unwrap();
    let done = drain(&mut ring);
    let err = done[0].1.as_ref().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn the_ring_takes_no_more_requests_than_it_has_room_for() {
    let (_temp, file) = file();
    let Some(mut ring) = ring::<u32>(file.as_raw_fd(), 4) else {
        return;
    };
    let mut buf = vec![0u8; 4 * 512];
    let mut chunks = buf.chunks_mut(512);
    for token in 0..4 {
        assert!(ring.has_room());
        let vecs = vecs(chunks.next().unwrap(), 512);
        // SAFETY: `buf` outlives the requests: `drain` waits for them.
        unsafe { ring.push(IoKind::Read, 0, vecs, token) }.unwrap();
    }
    assert!(!ring.has_room());
    // SAFETY: no vectors.
    let refused = unsafe { ring.push(IoKind::Flush, 0, IoVecs::default(), 9) };
    assert_eq!(refused, Err(9));
    assert_eq!(drain(&mut ring).len(), 4);
    assert!(ring.has_room());
}

/// The capacity of a pipe, in bytes.
fn pipe_capacity(fd: RawFd) -> usize {
    // SAFETY: F_GETPIPE_SZ only reads the descriptor's pipe size.
    let size = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    usize::try_from(size).unwrap()
}

#[test]
fn a_flush_waits_for_the_writes_pushed_before_it() {
    // A write into a full pipe stays in the kernel until the pipe is read: a write that is slow for as long as the
    // test likes.
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let capacity = pipe_capacity(writer.as_raw_fd());
    writer.write_all(&vec![1u8; capacity]).unwrap();
    let Some(mut ring) = ring::<&str>(writer.as_raw_fd(), 8) else {
        return;
    };
    let mut data = vec![2u8; 4096];
    let vecs = vecs(&mut data, 4096);
    // SAFETY: `data` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Write { durable: false }, 0, vecs, "write") }.unwrap();
    // SAFETY: no vectors.
    unsafe { ring.push(IoKind::Flush, 0, IoVecs::default(), "flush") }.unwrap();
    let mut done = Vec::new();
    ring.poll(|token, _| done.push(token));
    assert!(done.is_empty(), "{done:?}");
    assert_eq!(ring.held_flushes.len(), 1, "the flush is held back");
    // The write is still outstanding.
    assert_eq!((ring.writes, ring.in_flight()), (1, 2));

    // Make room: the write goes through, then the flush (which a pipe refuses; only the order matters).
    let mut sink = vec![0u8; capacity];
    reader.read_exact(&mut sink).unwrap();
    let done = drain(&mut ring);
    let order: Vec<&str> = done.iter().map(|(token, _)| *token).collect();
    assert_eq!(order, ["write", "flush"]);
    assert!(done[0].1.is_ok());
    assert!(ring.held_flushes.is_empty());
    let mut written = vec![0u8; 4096];
    reader.read_exact(&mut written).unwrap();
    assert_eq!(written, data);
}

#[test]
fn a_flush_without_earlier_writes_goes_out_at_once() {
    let (_temp, file) = file();
    let Some(mut ring) = ring::<u8>(file.as_raw_fd(), 4) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    let vecs = vecs(&mut buf, 4096);
    // SAFETY: `buf` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Read, 0, vecs, 1) }.unwrap();
    // SAFETY: no vectors.
    unsafe { ring.push(IoKind::Flush, 0, IoVecs::default(), 2) }.unwrap();
    assert!(ring.held_flushes.is_empty());
    let done = drain(&mut ring);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|(_, result)| result.is_ok()));
}

#[test]
fn cancel_all_ends_requests_stuck_in_the_kernel() {
    // Reads from an empty pipe never finish on their own.
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let Some(mut ring) = ring::<std::sync::Arc<()>>(reader.as_raw_fd(), 8) else {
        return;
    };
    let alive = std::sync::Arc::new(());
    let mut bufs = [[0u8; 64]; 3];
    for buf in bufs.iter_mut() {
        let vecs = vecs(buf, 64);
        // SAFETY: `bufs` outlives the requests: `cancel_all` below ends them before the test goes on.
        unsafe { ring.push(IoKind::Read, 0, vecs, alive.clone()) }.unwrap();
    }
    let mut done = 0;
    ring.poll(|_, _| done += 1);
    assert_eq!((done, ring.in_flight()), (0, 3));
    ring.cancel_all();
    assert_eq!(ring.in_flight(), 0);
    assert_eq!(
        std::sync::Arc::strong_count(&alive),
        1,
        "every token was let go"
    );
    // Nothing reads the pipe any more: what is written stays there, and the buffers stay untouched.
    writer.write_all(b"after").unwrap();
    let mut back = [0u8; 5];
    reader.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after");
    assert!(bufs.iter().all(|buf| buf.iter().all(|&byte| byte == 0)));
    // The ring still works afterwards; a short read (5 bytes, then 59) is completed by a second submission.
    let vecs = vecs(&mut bufs[0], 64);
    writer.write_all(b"again").unwrap();
    // SAFETY: `bufs` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Read, 0, vecs, alive.clone()) }.unwrap();
    let mut done = 0;
    ring.poll(|_, _| done += 1);
    assert_eq!((done, ring.in_flight()), (0, 1));
    writer.write_all(&[7u8; 59]).unwrap();
    let done = drain(&mut ring);
    assert!(done[0].1.is_ok());
    assert_eq!(&bufs[0][..5], b"again");
    assert!(bufs[0][5..].iter().all(|&byte| byte == 7));
    assert!(ring.counts.resubmitted >= 1);
}

#[test]
fn a_durable_write_syncs_its_range_only_once_written() {
    let (temp, file) = file();
    let Some(mut ring) = ring::<u8>(file.as_raw_fd(), 4) else {
        return;
    };
    let mut data = vec![9u8; 8192];
    let written = vecs(&mut data, 4096);
    // SAFETY: `data` outlives the request: `drain` waits for it.
    unsafe { ring.push(IoKind::Write { durable: true }, 4096, written, 1) }.unwrap();
    let done = drain(&mut ring);
    assert!(done[0].1.is_ok());
    assert_eq!((ring.counts.writes, ring.counts.range_syncs), (1, 1));
    let host = std::fs::read(temp.as_path()).unwrap();
    assert!(host[4096..12288].iter().all(|&byte| byte == 9));

    // A write that fails is not synced.
    let read_only = std::fs::File::open(temp.as_path()).unwrap();
    let mut refusing = Uring::<u8>::new(read_only.as_raw_fd(), 4).unwrap();
    let vecs = vecs(&mut data, 4096);
    // SAFETY: as above.
    unsafe { refusing.push(IoKind::Write { durable: true }, 0, vecs, 2) }.unwrap();
    let done = drain(&mut refusing);
    assert_eq!(
        done[0].1.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!((refusing.counts.range_syncs, refusing.writes), (0, 0));
}
