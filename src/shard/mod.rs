//! A shard's state and the messages it takes. Runs on a shard thread (one glommio executor per
//! core); a leaf: the executor loop (`crate::executor`) and the connection drivers
//! (`crate::conn`) build on it, it depends on neither.
//!
//! Each device is owned by exactly one shard, [`shard_for`]`(imei)`: its session, counters and
//! pending work live on that core. Every inbox is a `futures` unbounded channel: any thread
//! (another shard, the main thread, the housekeeper) can send to it, and the shard awaits it
//! like any local future. That is the one mechanism for messages into a shard.

pub mod budget;
pub mod copy;
pub mod devices;
pub mod pool;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::future::{select, Either, Shared};
use glommio::sync::Gate;
use glommio::timer::Timer;

use crate::config::Config;
use crate::control::ControlTx;
use crate::log_every::LogEvery;
use crate::policy::{DevicePolicy, TelemetryPolicy};
use crate::protocol::Imei;
use crate::session::{CloseReason, SessionConfig};
use crate::sink::{SessionEvent, WriterTx};

use budget::ByteBudget;
use devices::{DeviceInfo, DeviceTable};
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

/// At most one "connection limit reached" line per shard this often.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

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
    /// The device policy changed: end the sessions of devices it no longer admits.
    PolicyChanged,
    /// The connected devices with an IMEI in `range`, after `after`, at most `limit`, in IMEI
    /// order (one page of `GET /api/v1/devices`, merged over the shards by the API).
    ListDevices {
        range: (Imei, Imei),
        after: Option<Imei>,
        limit: usize,
        reply: futures::channel::oneshot::Sender<Vec<DeviceInfo>>,
    },
    /// The live session of a device this shard owns, if it is connected.
    GetDevice {
        imei: Imei,
        reply: futures::channel::oneshot::Sender<Option<DeviceInfo>>,
    },
    /// Send command `id` (its encoded Codec 12/14 frame) to a device this shard owns; the
    /// outcome comes back on the control channel.
    SendCommand { id: i64, imei: Imei, frame: Vec<u8> },
    /// Stop accepting, finish what is in flight, close, exit.
    Shutdown,
}

/// Counters of one shard, readable from any thread (`gateway_*_total` in the metrics).
#[derive(Debug, Default)]
pub struct ShardStats {
    /// The shard is bound and accepting (false before it starts and once it stops).
    pub accepting: std::sync::atomic::AtomicBool,
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    pub accept_errors: AtomicU64,
    pub logins_accepted: AtomicU64,
    pub logins_rejected: AtomicU64,
    pub login_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub handoffs: AtomicU64,
    pub handoffs_failed: AtomicU64,
    pub replaced: AtomicU64,
    pub disabled: AtomicU64,
    pub decode_errors: AtomicU64,
    pub frames_received: AtomicU64,
    pub records_acked: AtomicU64,
    pub frames_failed: AtomicU64,
    pub commands_received: AtomicU64,
    pub udp_datagrams: AtomicU64,
    pub udp_errors: AtomicU64,
    pub udp_records_acked: AtomicU64,
    /// Devices not tracked because the device table was full (spoofed UDP IMEIs and the like).
    pub devices_untracked: AtomicU64,
}

impl ShardStats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a connection is told to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// Stop reading; ack what commits; then close.
    Graceful(CloseReason),
    /// Close now, whatever the connection is waiting for.
    Abort(CloseReason),
}

/// What the shard tells a connection's task.
#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    Cancel(Cancel),
    /// Send command `id` (its encoded frame) to the device.
    Command {
        id: i64,
        frame: Vec<u8>,
    },
}

/// The shard's handle on one open connection: how anyone on the shard ends it (replacement,
/// policy change, shutdown) whatever it awaits, or hands it a command; and what the session
/// shows of itself (its [`LiveInfo`]). The connection's task polls [`ConnCtl::poll_signal`]
/// alongside everything else it waits for.
pub struct ConnCtl {
    pub id: u64,
    pub live: LiveInfo,
    cancel: Cell<Option<Cancel>>,
    commands: RefCell<VecDeque<(i64, Vec<u8>)>>,
    waker: Cell<Option<Waker>>,
}

/// A live session as the API shows it, kept current by the connection's task (plain cells:
/// only this shard reads or writes them).
#[derive(Debug, Default)]
pub struct LiveInfo {
    pub peer: Cell<Option<SocketAddr>>,
    pub connected_at_ms: Cell<u64>,
    pub last_frame_ms: Cell<u64>,
    pub last_sent_ms: Cell<u64>,
    pub frames: Cell<u64>,
    pub records: Cell<u64>,
    pub bytes_received: Cell<u64>,
    pub bytes_sent: Cell<u64>,
    pub commands_sent: Cell<u64>,
    pub last_fix: Cell<Option<Fix>>,
}

/// A position report: the last record of the last frame.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Fix {
    pub ts_ms: u64,
    pub lat: f64,
    pub lon: f64,
    pub alt: i16,
    pub angle: u16,
    pub sats: u8,
    pub speed: u16,
}

impl std::fmt::Debug for ConnCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCtl")
            .field("id", &self.id)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl ConnCtl {
    fn new(id: u64) -> ConnCtl {
        ConnCtl {
            id,
            live: LiveInfo::default(),
            cancel: Cell::new(None),
            commands: RefCell::new(VecDeque::new()),
            waker: Cell::new(None),
        }
    }

    /// Tells the connection to end; an abort outranks a graceful close.
    pub fn cancel(&self, c: Cancel) {
        let merged = match (self.cancel.get(), c) {
            (Some(a @ Cancel::Abort(_)), Cancel::Graceful(_)) => a,
            _ => c,
        };
        self.cancel.set(Some(merged));
        self.wake();
    }

    /// Hands command `id` to the connection.
    pub fn send_command(&self, id: i64, frame: Vec<u8>) {
        self.commands.borrow_mut().push_back((id, frame));
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The next signal for the connection (a cancellation first), if any.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        if let Some(c) = self.cancel.take() {
            return Poll::Ready(Signal::Cancel(c));
        }
        if let Some((id, frame)) = self.commands.borrow_mut().pop_front() {
            return Poll::Ready(Signal::Command { id, frame });
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// Keeps a connection in its shard's table (and its count) while it lives.
pub struct ConnGuard {
    shard: Rc<Shard>,
    pub ctl: Rc<ConnCtl>,
}

impl ConnGuard {
    /// Registers a connection, unless the shard is at its connection cap (`None`: refused and
    /// counted).
    pub fn register(shard: &Rc<Shard>) -> Option<ConnGuard> {
        if shard.conns.borrow().len() >= shard.config.max_connections_per_shard {
            ShardStats::inc(&shard.stats.connections_refused);
            // A storm past the cap refuses thousands a second: one line per period, with the
            // count; every refusal is in `fleetgate_connections_refused_total`.
            if let Some(held_back) = shard.refused_log.ready() {
                tracing::warn!(
                    shard = shard.id,
                    limit = shard.config.max_connections_per_shard,
                    refused_since_last_line = held_back + 1,
                    refused_total = shard.stats.connections_refused.load(Ordering::Relaxed),
                    "Connections refused: connection limit reached (max_connections_per_shard)."
                );
            }
            return None;
        }
        let ctl = Rc::new(ConnCtl::new(shard.next_conn_id()));
        shard.conns.borrow_mut().insert(ctl.id, ctl.clone());
        shard.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        Some(ConnGuard {
            shard: shard.clone(),
            ctl,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shard.conns.borrow_mut().remove(&self.ctl.id);
        self.shard
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a shard is made with: its place among the shards and its links to the other threads
/// (all `Send`: built on the main thread, moved to the shard's).
pub struct ShardLinks {
    pub id: usize,
    pub nr_shards: usize,
    pub config: Arc<Config>,
    /// Every shard's inbox, indexed by shard id.
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    pub writer: WriterTx,
    pub control: ControlTx,
    pub policy: Arc<DevicePolicy>,
    /// Which devices' frames become telemetry events.
    pub telemetry: Arc<TelemetryPolicy>,
    pub stats: Arc<ShardStats>,
    /// The shard's memory bound (the main thread keeps a clone for metrics).
    pub budget: ByteBudget,
}

/// A shard's state, shared by its tasks (`Rc`: it never leaves its thread).
pub struct Shard {
    pub id: usize,
    pub nr_shards: usize,
    pub config: Arc<Config>,
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    pub writer: WriterTx,
    pub control: ControlTx,
    pub policy: Arc<DevicePolicy>,
    pub telemetry: Arc<TelemetryPolicy>,
    pub stats: Arc<ShardStats>,
    pub devices: RefCell<DeviceTable>,
    pub pool: Rc<BufferPool>,
    /// The limits of a device session, one copy shared by this shard's sessions.
    pub session_config: Rc<SessionConfig>,
    /// The bytes of rows this shard may hold awaiting their commit (the memory bound).
    pub budget: ByteBudget,
    /// Open TCP connections of this shard: id -> handle.
    pub conns: RefCell<HashMap<u64, Rc<ConnCtl>>>,
    next_conn: Cell<u64>,
    /// Paces the "connection limit reached" warning.
    refused_log: LogEvery,
    /// Completes when the shard starts stopping.
    pub stopping: Shared<futures::channel::oneshot::Receiver<()>>,
    /// Tasks to wait for at shutdown.
    pub gate: Gate,
}

impl Shard {
    pub fn new(
        links: ShardLinks,
        stopping: Shared<futures::channel::oneshot::Receiver<()>>,
    ) -> Shard {
        let ShardLinks {
            id,
            nr_shards,
            config,
            inboxes,
            writer,
            control,
            policy,
            telemetry,
            stats,
            budget,
        } = links;
        let max_buf = config.max_frame_len as usize
            + crate::protocol::tcp::HEADER_LEN
            + crate::protocol::tcp::TRAILER_LEN;
        Shard {
            id,
            nr_shards,
            devices: RefCell::new(DeviceTable::new(config.max_connections_per_shard)),
            pool: BufferPool::new(pool::BUFFER_SIZE, max_buf),
            session_config: Rc::new(session_config(&config)),
            config,
            inboxes,
            writer,
            control,
            policy,
            telemetry,
            stats,
            budget,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            refused_log: LogEvery::new(REFUSED_LOG_EVERY),
            stopping,
            gate: Gate::new(),
        }
    }

    /// A new connection id, unique on this shard.
    pub fn next_conn_id(&self) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        (id << 10) | self.id as u64
    }

    /// Counts stored records for `imei` on its owning shard: here, or by message.
    pub fn count_stored(&self, imei: Imei, records: u32) {
        let at_ms = crate::time::unix_now_ms();
        let owner = shard_for(imei, self.nr_shards);
        if owner == self.id {
            self.stored(imei, records, at_ms);
        } else {
            let _ = self.inboxes[owner].unbounded_send(ShardMsg::Stored {
                imei,
                records,
                at_ms,
            });
        }
    }

    /// Counts stored records of a device this shard owns.
    pub fn stored(&self, imei: Imei, records: u32, at_ms: u64) {
        if !self.devices.borrow_mut().stored(imei, records, at_ms) {
            ShardStats::inc(&self.stats.devices_untracked);
        }
    }

    /// Sends a connect or disconnect event to the writer (its own bounded budget: a full one
    /// drops the event, counted by the writer, never a frame).
    pub fn session_event(
        &self,
        imei: Imei,
        event: &'static str,
        peer: Option<SocketAddr>,
        reason: Option<String>,
    ) {
        self.writer.send_event(SessionEvent {
            imei: imei.as_u64(),
            event,
            at: std::time::SystemTime::now(),
            shard: self.id as u32,
            transport: "tcp",
            peer: peer.map(|p| p.to_string()),
            reason,
        });
    }

    /// Hands command `id` to the device's connection, or reports it undelivered.
    pub fn send_command(&self, id: i64, imei: Imei, frame: Vec<u8>) {
        let conn = self.devices.borrow().get(imei).and_then(|d| d.conn.clone());
        match conn {
            Some(c) => c.send_command(id, frame),
            None => {
                let _ = self
                    .control
                    .send(crate::control::ControlMsg::CommandUndelivered { id, imei });
            }
        }
    }

    /// Ends the sessions of devices the policy no longer admits.
    pub fn enforce_policy(&self) {
        let refused: Vec<Rc<ConnCtl>> = self
            .devices
            .borrow()
            .connected()
            .filter(|(imei, _)| !self.policy.admits(*imei))
            .map(|(_, ctl)| ctl.clone())
            .collect();
        for ctl in refused {
            ShardStats::inc(&self.stats.disabled);
            ctl.cancel(Cancel::Abort(CloseReason::DeviceDisabled));
        }
    }

    /// Tells every open connection to end.
    pub fn cancel_all(&self, c: Cancel) {
        let conns: Vec<Rc<ConnCtl>> = self.conns.borrow().values().cloned().collect();
        for ctl in conns {
            ctl.cancel(c);
        }
    }

    /// Whether the shard is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.peek().is_some()
    }
}

/// The limits of a device session, from the gateway's config.
fn session_config(c: &Config) -> SessionConfig {
    SessionConfig {
        max_frame_len: c.max_frame_len,
        max_frames_in_flight: c.max_frames_in_flight_per_connection,
        login_timeout: c.login_timeout(),
        idle_timeout: c.idle_timeout(),
        write_timeout: c.write_timeout(),
        command_timeout: c.command_timeout(),
    }
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
    if let Ok(pass) = gate.enter() {
        glommio::spawn_local(gated(pass, fut)).detach();
    }
}

/// `fut`, holding the gate's pass until it ends (completed or dropped). A plain combinator, the
/// size of `fut` plus the pass: glommio's own `Gate::spawn` wraps the future in an `async`
/// block, which stores it twice (the captured future and the one being awaited), so every
/// connection's task took 2.9 KiB instead of 1.4, and past 2 KiB glommio boxes the future in a
/// second allocation (tuning/idle-memory.md).
pub(crate) fn gated<F: std::future::Future<Output = ()>>(
    pass: glommio::sync::Pass,
    fut: F,
) -> impl std::future::Future<Output = ()> {
    futures::FutureExt::map(fut, move |()| drop(pass))
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

    #[test]
    fn a_gated_task_is_its_future_plus_the_pass() {
        let gate = Gate::new();
        let state = [7u8; 1024];
        let fut = async move {
            futures::future::ready(()).await;
            std::hint::black_box(&state);
        };
        let alone = std::mem::size_of_val(&fut);
        let task = gated(gate.enter().unwrap(), fut);
        assert!(
            std::mem::size_of_val(&task) <= alone + 16,
            "{} bytes for a future of {alone}",
            std::mem::size_of_val(&task)
        );
    }

    /// One `ConnCtl` per open connection, in an `Rc` (16 bytes of counts): at most 256 bytes
    /// in all, mimalloc's 256-byte size class (272 took the 320-byte class).
    #[test]
    fn a_conn_ctl_fits_in_256_bytes_with_its_rc() {
        let size = std::mem::size_of::<ConnCtl>();
        assert!(size + 16 <= 256, "ConnCtl is {size} bytes");
    }

    #[test]
    fn an_abort_outranks_a_graceful_close_and_comes_before_commands() {
        let ctl = ConnCtl::new(1);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(ctl.poll_signal(&mut cx).is_pending());
        ctl.send_command(5, vec![1]);
        ctl.cancel(Cancel::Abort(CloseReason::Replaced));
        ctl.cancel(Cancel::Graceful(CloseReason::Shutdown));
        assert_eq!(
            ctl.poll_signal(&mut cx),
            Poll::Ready(Signal::Cancel(Cancel::Abort(CloseReason::Replaced)))
        );
        assert_eq!(
            ctl.poll_signal(&mut cx),
            Poll::Ready(Signal::Command {
                id: 5,
                frame: vec![1]
            })
        );
        assert!(ctl.poll_signal(&mut cx).is_pending());
    }
}
