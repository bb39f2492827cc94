//! One shard per core: a glommio executor with its own SO_REUSEPORT TCP listener and UDP socket
//! on the device port. Runs on a shard thread.
//!
//! The kernel spreads new connections over the shards' listeners; the shard that accepts a
//! connection reads its login and hands the socket (with any bytes already read) to the
//! device's owning shard, [`shard_for`]`(imei)`, through that shard's inbox. From then on the
//! device's session, counters and pending work live on that one core.
//!
//! Every inbox is a `futures` unbounded channel: any thread (another shard, the main thread)
//! can send to it, and the shard awaits it like any local future. That is the one mechanism
//! for messages into a shard.

pub mod devices;
pub mod pool;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::future::{select, Either, FutureExt, Shared};
use futures::StreamExt;
use glommio::net::{TcpListener, UdpSocket};
use glommio::sync::{Gate, Semaphore};
use glommio::timer::Timer;

use crate::config::Config;
use crate::policy::DevicePolicy;
use crate::protocol::AvlData;
use crate::protocol::Imei;
use crate::sink::copy::encode_rows;
use crate::sink::{WriteOutcome, WriterBatch, WriterTx};
use futures::channel::oneshot;
use glommio::sync::StaticPermit;

use devices::DeviceTable;
use pool::BufferPool;

/// The shard that owns `imei`: a well-mixed hash of the IMEI modulo the shard count.
pub fn shard_for(imei: Imei, nr_shards: usize) -> usize {
    // splitmix64 finalizer: consecutive IMEIs spread evenly.
    let mut z = imei.as_u64().wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % nr_shards as u64) as usize
}

/// Messages into a shard's inbox.
pub enum ShardMsg {
    /// A logged-in TCP connection of a device this shard owns, accepted by another shard.
    Adopt {
        fd: OwnedFd,
        imei: Imei,
        peer: SocketAddr,
        pending: Vec<u8>,
    },
    /// Records of a device this shard owns were stored from a datagram another shard received
    /// (UDP has no login to route by, so the kernel's choice of socket stands for the data path).
    Stored {
        imei: Imei,
        records: u32,
        at_ms: u64,
    },
    /// Stop accepting, finish what is in flight, close, exit.
    Shutdown,
}

/// Counters of one shard, readable from any thread (`gateway_*_total` in the metrics).
#[derive(Debug, Default)]
pub struct ShardStats {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    pub logins_accepted: AtomicU64,
    pub logins_rejected: AtomicU64,
    pub login_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub handoffs: AtomicU64,
    pub replaced: AtomicU64,
    pub decode_errors: AtomicU64,
    pub frames_received: AtomicU64,
    pub records_acked: AtomicU64,
    pub frames_failed: AtomicU64,
    pub commands_received: AtomicU64,
    pub udp_datagrams: AtomicU64,
    pub udp_errors: AtomicU64,
    pub udp_records_acked: AtomicU64,
}

impl ShardStats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a shard thread is started with.
pub struct ShardSpec {
    pub shard_id: usize,
    pub nr_shards: usize,
    pub config: Arc<Config>,
    /// The resolved device address (port already chosen).
    pub device_addr: SocketAddr,
    /// Every shard's inbox, indexed by shard id.
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    pub inbox: UnboundedReceiver<ShardMsg>,
    pub writer: WriterTx,
    pub policy: Arc<DevicePolicy>,
    pub stats: Arc<ShardStats>,
}

/// A shard's state, shared by its tasks (`Rc`: it never leaves its thread).
pub struct Shard {
    pub id: usize,
    pub nr_shards: usize,
    pub config: Arc<Config>,
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    pub writer: WriterTx,
    pub policy: Arc<DevicePolicy>,
    pub stats: Arc<ShardStats>,
    pub devices: RefCell<DeviceTable>,
    pub pool: Rc<BufferPool>,
    /// Frames of this shard waiting for their commit; a permit per frame.
    pub in_flight: Rc<Semaphore>,
    /// Open TCP connections of this shard: id -> socket, to close them on shutdown.
    pub conns: RefCell<HashMap<u64, RawFd>>,
    next_conn: Cell<u64>,
    /// Completes when the shard starts stopping.
    pub stopping: Shared<futures::channel::oneshot::Receiver<()>>,
    /// Tasks to wait for at shutdown.
    pub gate: Gate,
}

impl Shard {
    /// A new connection id, unique on this shard.
    pub fn next_conn_id(&self) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        (id << 10) | self.id as u64
    }

    /// Encodes a frame's (or datagram's) rows and hands them to the writer, holding one of the
    /// shard's in-flight permits until the answer is dropped: the one path from decoded
    /// records to the writer, for TCP and UDP alike. Waits while the shard is at its
    /// in-flight limit (back-pressure).
    ///
    /// # Errors
    /// The shard is stopping, or the writer's queue is full or gone.
    pub async fn submit(&self, imei: Imei, avl: &AvlData<'_>) -> Result<Submitted, SubmitError> {
        let records = avl.count() as u32;
        let mut rows = Vec::with_capacity(avl.records_bytes().len() * 2 + 64);
        encode_rows(imei, avl, unix_now_us(), &mut rows);
        let permit = self
            .in_flight
            .acquire_static_permit(1)
            .await
            .map_err(|_| SubmitError::Stopping)?;
        let (tx, done) = oneshot::channel();
        let batch = WriterBatch {
            rows: rows.into(),
            records,
            done: tx,
        };
        if self.writer.send_rows(batch).is_err() {
            tracing::error!(shard = self.id, %imei, "Writer queue full or gone; records not accepted.");
            return Err(SubmitError::WriterUnavailable);
        }
        Ok(Submitted {
            done,
            records,
            _permit: permit,
        })
    }

    /// Counts stored records for `imei` on its owning shard: here, or by message.
    pub fn count_stored(&self, imei: Imei, records: u32) {
        let at_ms = (unix_now_us() / 1000) as u64;
        let owner = shard_for(imei, self.nr_shards);
        if owner == self.id {
            self.devices.borrow_mut().stored(imei, records, at_ms);
        } else {
            let _ = self.inboxes[owner].unbounded_send(ShardMsg::Stored {
                imei,
                records,
                at_ms,
            });
        }
    }

    /// Whether the shard is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.peek().is_some()
    }
}

/// Rows handed to the writer: the answer to await before acking, and the shard in-flight
/// permit it holds meanwhile.
pub struct Submitted {
    pub done: oneshot::Receiver<WriteOutcome>,
    pub records: u32,
    _permit: StaticPermit,
}

/// Why rows could not be handed to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    Stopping,
    WriterUnavailable,
}

/// The gateway's clock: microseconds since the Unix epoch.
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Runs `fut` for at most `dur`; `None` when time ran out.
pub async fn with_timeout<T>(
    dur: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    futures::pin_mut!(fut);
    match select(fut, Timer::new(dur)).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

/// Spawns a task the gate waits for at shutdown. (Dropping a glommio `Task` cancels it, hence
/// the detach.) Fails only once the gate is closing, when new work is not wanted.
pub fn spawn_detached(gate: &Gate, fut: impl std::future::Future<Output = ()> + 'static) {
    if let Ok(task) = gate.spawn(fut) {
        task.detach();
    }
}

/// Stops a socket's reading side: a pending read returns end-of-stream, so its task winds
/// down through its normal path (acks of committed frames still go out).
pub fn shut_read(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor this shard owns and has not closed; worst case EBADF.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RD);
    }
}

/// The body of a shard thread: bind, report readiness, serve until told to stop.
///
/// `ready` is answered once, with the bind result, so `serve` fails loudly if a shard cannot
/// start.
pub async fn run(
    spec: ShardSpec,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    shutdown_timeout: Duration,
) {
    let ShardSpec {
        shard_id,
        nr_shards,
        config,
        device_addr,
        inboxes,
        mut inbox,
        writer,
        policy,
        stats,
    } = spec;
    let bound = bind_device_sockets(device_addr)
        .map_err(|e| format!("shard {shard_id}: cannot bind {device_addr}: {e}"));
    let (listener, udp) = match bound {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let buffer_size = config.max_frame_len as usize
        + crate::protocol::tcp::HEADER_LEN
        + crate::protocol::tcp::TRAILER_LEN;
    let shard = Rc::new(Shard {
        id: shard_id,
        nr_shards,
        in_flight: Rc::new(Semaphore::new(config.max_frames_in_flight_per_shard as u64)),
        config,
        inboxes,
        writer,
        policy,
        stats,
        devices: RefCell::new(DeviceTable::default()),
        pool: BufferPool::new(buffer_size, 1024),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(1),
        stopping: stop_rx.shared(),
        gate: Gate::new(),
    });
    let _ = ready.send(Ok(()));
    tracing::info!(shard = shard_id, addr = %device_addr, "Shard listening.");

    let accept = glommio::spawn_local(accept_loop(shard.clone(), listener));
    let udp = glommio::spawn_local(crate::conn::udp::serve(shard.clone(), Rc::new(udp)));

    // The inbox: handed-over connections, and the order to stop.
    while let Some(msg) = inbox.next().await {
        match msg {
            ShardMsg::Adopt {
                fd,
                imei,
                peer,
                pending,
            } => {
                let s = shard.clone();
                spawn_detached(
                    &shard.gate,
                    crate::conn::tcp::adopt(s, fd, imei, peer, pending),
                );
            }
            ShardMsg::Stored {
                imei,
                records,
                at_ms,
            } => shard.devices.borrow_mut().stored(imei, records, at_ms),
            ShardMsg::Shutdown => break,
        }
    }

    // Stop: no new connections or datagrams; readers end; in-flight frames commit and are acked.
    let _ = stop_tx.send(());
    accept.await;
    udp.await;
    for &fd in shard.conns.borrow().values() {
        shut_read(fd);
    }
    if with_timeout(shutdown_timeout, shard.gate.close())
        .await
        .is_none()
    {
        tracing::warn!(
            shard = shard_id,
            "Shutdown deadline passed with frames still in flight; closing."
        );
    }
    tracing::info!(shard = shard_id, "Shard stopped.");
}

/// Listen backlog of each shard's listener: a fleet reconnecting after an outage arrives at once.
const LISTEN_BACKLOG: i32 = 4096;

/// Receive buffer of each shard's UDP socket. The kernel default (~208 KiB) dropped 5% of the
/// datagrams of 500 devices with 4 in flight each (tuning/ingest.md), each drop costing a
/// device a resend after its timeout.
const UDP_RECV_BUFFER: usize = 8 << 20;

/// Sets the UDP receive buffer: SO_RCVBUFFORCE when privileged (it passes the
/// `net.core.rmem_max` cap), else SO_RCVBUF (capped; raise the sysctl, see tuning/).
fn set_udp_receive_buffer(sock: &socket2::Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt on an open socket with a correctly sized int option.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    let got = sock.recv_buffer_size().unwrap_or(0);
    if got < bytes {
        tracing::warn!(
            wanted = bytes,
            got,
            "UDP receive buffer capped by net.core.rmem_max; bursts may drop datagrams."
        );
    }
}

/// This shard's TCP listener and UDP socket on the device address, both SO_REUSEPORT (one of
/// each per shard; the kernel spreads connections and datagrams over them) and SO_REUSEADDR
/// (so a restarted gateway can bind while its predecessor's closed connections linger, and so
/// `serve`'s plain probe bind conflicts only with a live listener).
fn bind_device_sockets(addr: SocketAddr) -> std::io::Result<(TcpListener, UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let domain = Domain::for_address(addr);
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(LISTEN_BACKLOG)?;
    // SAFETY: a bound, listening socket whose ownership moves into the listener.
    let listener = unsafe { TcpListener::from_raw_fd(tcp.into_raw_fd()) };
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_reuse_address(true)?;
    udp.set_reuse_port(true)?;
    set_udp_receive_buffer(&udp, UDP_RECV_BUFFER);
    udp.bind(&addr.into())?;
    // SAFETY: a bound socket whose ownership moves into the glommio socket.
    let udp = unsafe { UdpSocket::from_raw_fd(udp.into_raw_fd()) };
    Ok((listener, udp))
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let accepted = {
            let stop = shard.stopping.clone();
            let acc = listener.accept();
            futures::pin_mut!(acc);
            match select(acc, stop).await {
                Either::Left((r, _)) => r,
                Either::Right(_) => return,
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "Accept failed.");
                // Out of descriptors and the like: give the system a moment.
                Timer::new(Duration::from_millis(10)).await;
                continue;
            }
        };
        ShardStats::inc(&shard.stats.connections_accepted);
        if shard.conns.borrow().len() >= shard.config.max_connections_per_shard {
            ShardStats::inc(&shard.stats.connections_refused);
            tracing::warn!(
                shard = shard.id,
                "Connection refused: connection limit reached."
            );
            drop(stream);
            continue;
        }
        let conn = crate::conn::tcp::ConnGuard::register(&shard, stream.as_raw_fd());
        spawn_detached(
            &shard.gate,
            crate::conn::tcp::accepted(shard.clone(), stream, conn),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_imeis_spread_evenly_over_shards() {
        let mut counts = [0u32; 4];
        for n in 0..10_000u64 {
            counts[shard_for(Imei::new(356_000_000_000_000 + n).unwrap(), 4)] += 1;
        }
        for c in counts {
            assert!((2_300..=2_700).contains(&c), "{counts:?}");
        }
        assert_eq!(shard_for(Imei::new(1).unwrap(), 1), 0);
    }
}
