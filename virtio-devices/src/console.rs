//! virtio-console (device type 3) with a single port: receive queue 0 carries host input to the guest, transmit
//! queue 1 carries guest output to the host. No multiport, no console size (`cols` and `rows` read as 0).
//!
//! Output goes to any `Write` the VMM gives ([`Console::new`]). Input is pushed, like the serial port's: the VMM
//! reads its input source (a terminal, a socket) and calls [`ConsoleInput::enqueue_input`], which buffers up to
//! [`CONSOLE_INPUT_CAPACITY`] bytes and wakes the device thread through an internal event; the thread moves the
//! bytes into the driver's receive buffers as the driver posts them. Buffered input survives a device reset.
//!
//! VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a write to `emerg_wr` in the configuration space sends one byte to the
//! output, which works before the queues are set up.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain::descriptors;
use crate::counters::{ConsoleCounters, Counter, DeviceCounters};
use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, GuestMemoryMmap, VirtioDevice, VirtioDeviceType,
    VirtioInterrupt, COMMON_FEATURES,
};
use crate::io_worker::{notify, serve_queue, stop_queue, IoHandler, IoWorker, Poller, QueueSlot};
use crate::worker::{ChainHandler, QueueError};

/// Size of both queues.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Most input bytes buffered while the guest does not read them.
pub const CONSOLE_INPUT_CAPACITY: usize = 64 * 1024;
/// The device accepts single bytes written to `emerg_wr` (virtio 1.2 §5.3.3).
const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// Offset of `emerg_wr` in `virtio_console_config` (after `cols`, `rows` and `max_nr_ports`).
const EMERG_WR_OFFSET: u64 = 8;
/// Size of `virtio_console_config`.
const CONFIG_SIZE: usize = 12;
/// The receive and transmit queues.
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Token of the input event in the device thread's epoll set.
const INPUT_TOKEN: u64 = 2;
/// Bytes copied from guest memory at a time when writing output.
const OUTPUT_CHUNK: usize = 4096;

/// Errors of the console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The input buffer is full.
    #[error("console input buffer full: {accepted} of {len} bytes queued; offer the rest again once the guest reads")]
    InputFull {
        /// Bytes queued.
        accepted: usize,
        /// Bytes offered.
        len: usize,
    },
    /// The input event cannot be created.
    #[error(
        "cannot create the console input event: {0}; check the process's file descriptor limit"
    )]
    Event(#[source] io::Error),
}

/// Where guest output goes.
type Output = Arc<Mutex<Box<dyn Write + Send>>>;

fn lock_output(output: &Output) -> MutexGuard<'_, Box<dyn Write + Send>> {
    // A panic while writing leaves nothing half-updated that matters here.
    output
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Input waiting for the guest, and the event that wakes the device thread.
struct Input {
    bytes: Mutex<VecDeque<u8>>,
    event: EventFd,
}

impl Input {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The handle the VMM pushes console input through. Cloneable and usable from any thread.
#[derive(Clone)]
pub struct ConsoleInput(Arc<Input>);

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleInput")
            .field("buffered", &self.0.lock().len())
            .finish()
    }
}

impl ConsoleInput {
    /// Queues `bytes` for the guest. Queues as much as fits; if not everything did, returns
    /// [`ConsoleError::InputFull`] saying how much was taken, so the caller can offer the rest again later.
    pub fn enqueue_input(&self, bytes: &[u8]) -> Result<(), ConsoleError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let accepted = {
            let mut buffer = self.0.lock();
            let accepted = bytes.len().min(CONSOLE_INPUT_CAPACITY - buffer.len());
            buffer.extend(&bytes[..accepted]);
            accepted
        };
        if accepted > 0 {
            if let Err(err) = self.0.event.write(1) {
                tracing::warn!(%err, "cannot wake the virtio-console thread for new input");
            }
        }
        if accepted < bytes.len() {
            return Err(ConsoleError::InputFull {
                accepted,
                len: bytes.len(),
            });
        }
        Ok(())
    }

    /// Room left in the input buffer, in bytes.
    pub fn capacity(&self) -> usize {
        CONSOLE_INPUT_CAPACITY - self.0.lock().len()
    }
}

/// Serves the transmit queue: every driver-readable byte goes to the output.
struct OutputHandler {
    output: Output,
    buf: Vec<u8>,
    failing: bool,
    counters: Arc<ConsoleCounters>,
}

impl OutputHandler {
    fn write(&mut self, bytes: &[u8]) {
        let result = lock_output(&self.output).write_all(bytes);
        match result {
            Ok(()) => self.failing = false,
            Err(err) if !self.failing => {
                tracing::warn!(%err, "console output failed; dropping guest output");
                self.failing = true;
            }
            Err(_) => {}
        }
    }
}

impl ChainHandler for OutputHandler {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let descs = match descriptors(chain) {
            Ok(descs) => descs,
            Err(err) => {
                tracing::debug!(%err, "skipping a virtio-console output chain");
                return 0;
            }
        };
        let usable = descs
            .iter()
            .all(|desc| !desc.is_write_only() && mem.check_range(desc.addr(), desc.len() as usize));
        if !usable {
            tracing::debug!(
                "skipping a virtio-console output chain with a writable or unmapped buffer"
            );
            return 0;
        }
        let mut buf = std::mem::take(&mut self.buf);
        for desc in &descs {
            let mut done = 0usize;
            let len = desc.len() as usize;
            while done < len {
                let take = (len - done).min(OUTPUT_CHUNK);
                let Some(addr) = desc.addr().checked_add(done as u64) else {
                    break;
                };
                if mem.read_slice(&mut buf[..take], addr).is_err() {
                    break;
                }
                self.counters.tx_bytes.add(take as u64);
                self.write(&buf[..take]);
                done += take;
            }
        }
        self.buf = buf;
        if let Err(err) = lock_output(&self.output).flush() {
            tracing::debug!(%err, "console output flush failed");
        }
        0
    }
}

/// Moves buffered input into the receive queue's chains, counting the bytes in `delivered`. Returns whether the used
/// ring changed. Malformed chains (a driver-readable descriptor, outside guest memory) are returned with a used
/// length of 0.
fn deliver_input(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    input: &mut VecDeque<u8>,
    delivered: &Counter,
) -> Result<bool, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let mut used = false;
    let mut rechecked = false;
    queue.disable_notification(mem).map_err(corrupt)?;
    while !input.is_empty() {
        let chain = queue.iter(mem).map_err(corrupt)?.next();
        let Some(chain) = chain else {
            if rechecked {
                // The available index says there is a chain, but none can be read.
                return Err(QueueError::Stalled { index });
            }
            // Out of buffers: have the driver say when it posts more.
            if queue.enable_notification(mem).map_err(corrupt)? {
                rechecked = true;
                continue;
            }
            break;
        };
        rechecked = false;
        let head = chain.head_index();
        let written = match descriptors(chain) {
            Ok(descs)
                if descs.iter().all(|desc| {
                    desc.is_write_only() && mem.check_range(desc.addr(), desc.len() as usize)
                }) =>
            {
                let mut written = 0usize;
                for desc in &descs {
                    let take = (desc.len() as usize).min(input.len());
                    if take == 0 {
                        break;
                    }
                    let bytes: Vec<u8> = input.drain(..take).collect();
                    if let Err(err) = mem.write_slice(&bytes, desc.addr()) {
                        // Checked above, so only a concurrent change of the memory map gets here.
                        tracing::warn!(%err, "failed to write console input into guest memory");
                    }
                    written += take;
                }
                written
            }
            _ => {
                tracing::debug!("skipping a malformed virtio-console input chain");
                0
            }
        };
        delivered.add(written as u64);
        // Lossless: at most CONSOLE_INPUT_CAPACITY bytes.
        queue.add_used(mem, head, written as u32).map_err(corrupt)?;
        used = true;
    }
    Ok(used)
}

/// The device thread.
struct ConsoleHandler {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Option<QueueSlot>,
    tx: Option<QueueSlot>,
    input: Arc<Input>,
    output: OutputHandler,
    counters: Arc<ConsoleCounters>,
}

impl ConsoleHandler {
    fn receive(&mut self) {
        let Some(slot) = self.rx.as_mut().filter(|slot| !slot.broken) else {
            return;
        };
        let guard = self.mem.memory();
        let mut input = self.input.lock();
        let delivered = deliver_input(
            &mut slot.queue,
            slot.index,
            &guard,
            &mut input,
            &self.counters.rx_bytes,
        );
        let result = delivered.and_then(|used| {
            if !used {
                return Ok(false);
            }
            slot.queue
                .needs_notification(&*guard)
                .map_err(|source| QueueError::Corrupt {
                    index: slot.index,
                    source,
                })
        });
        drop(input);
        match result {
            Ok(true) => notify(&*self.interrupt, slot.index),
            Ok(false) => {}
            Err(err) => stop_queue(&*self.interrupt, slot, &err),
        }
    }
}

impl IoHandler for ConsoleHandler {
    fn register(&mut self, poller: &Poller) -> io::Result<()> {
        for slot in self.rx.iter().chain(self.tx.iter()) {
            poller.add(slot.event.as_raw_fd(), slot.index as u64)?;
        }
        poller.add(self.input.event.as_raw_fd(), INPUT_TOKEN)?;
        if !self.input.lock().is_empty() {
            // Input from before activation: look for buffers as soon as the thread runs.
            self.input.event.write(1)?;
        }
        Ok(())
    }

    fn ready(&mut self, token: u64, _poller: &Poller) {
        match token {
            INPUT_TOKEN => {
                let _ = self.input.event.read();
                self.receive();
            }
            0 => {
                if let Some(slot) = &self.rx {
                    let _ = slot.event.read();
                }
                self.receive();
            }
            1 => {
                if let Some(slot) = self.tx.as_mut() {
                    serve_queue(&self.mem, &*self.interrupt, &mut self.output, slot);
                }
            }
            _ => {}
        }
    }

    fn into_queue_events(self) -> Vec<(usize, EventFd)> {
        self.rx
            .into_iter()
            .chain(self.tx)
            .map(|slot| (slot.index, slot.event))
            .collect()
    }
}

/// A virtio-console device.
pub struct Console {
    output: Output,
    input: Arc<Input>,
    acked_features: u64,
    counters: Arc<ConsoleCounters>,
    worker: Option<IoWorker>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing guest output to `output`. Input comes through [`Console::input`].
    pub fn new(output: Box<dyn Write + Send>) -> Result<Self, ConsoleError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::Event)?;
        Ok(Self {
            output: Arc::new(Mutex::new(output)),
            input: Arc::new(Input {
                bytes: Mutex::new(VecDeque::new()),
                event,
            }),
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        })
    }

    /// The handle to push input for the guest through.
    pub fn input(&self) -> ConsoleInput {
        ConsoleInput(self.input.clone())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Console
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows and max_nr_ports are 0 (neither SIZE nor MULTIPORT is offered); emerg_wr reads as 0.
        read_config_bytes(&[0; CONFIG_SIZE], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset != EMERG_WR_OFFSET {
            tracing::debug!(
                offset,
                len = data.len(),
                "dropping a virtio-console config write"
            );
            return;
        }
        let Some(byte) = data.first() else {
            return;
        };
        self.counters.tx_bytes.inc();
        let mut output = lock_output(&self.output);
        if let Err(err) = output.write_all(&[*byte]).and_then(|()| output.flush()) {
            tracing::debug!(%err, "console emergency write failed");
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.is_empty() {
            return Err(ActivateError::BadQueues(
                "virtio-console needs its receive or transmit queue".into(),
            ));
        }
        let (mut rx, mut tx) = (None, None);
        for (index, queue, event) in queues {
            let slot = Some(QueueSlot::new(index, queue, event));
            match index {
                RX_QUEUE => rx = slot,
                TX_QUEUE => tx = slot,
                _ => {
                    return Err(ActivateError::BadQueues(format!(
                    "virtio-console has no queue {index}; a single-port console has queues 0 and 1"
                )))
                }
            }
        }
        let handler = ConsoleHandler {
            mem,
            interrupt,
            rx,
            tx,
            input: self.input.clone(),
            output: OutputHandler {
                output: self.output.clone(),
                buf: vec![0; OUTPUT_CHUNK],
                failing: false,
                counters: self.counters.clone(),
            },
            counters: self.counters.clone(),
        };
        self.worker = Some(IoWorker::spawn("virtio-console", handler)?);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.worker.take().map(IoWorker::stop)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }
}

#[cfg(test)]
#[path = "console_tests.rs"]
mod tests;
