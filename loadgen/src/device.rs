//! One simulated device: a tokio task that connects, logs in, streams frames and waits for
//! their acks, the way a Teltonika tracker does. The device is the buffer: frames stay in
//! its queue until acked, and a lost connection is re-established and the unacked frames are
//! sent again, byte for byte.
//!
//! Latency is measured per frame from send to ack. With `--rate`, it counts from the frame's
//! scheduled time instead, so time spent waiting for a free in-flight slot (or a connection)
//! shows up as latency rather than as silently missed load.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fleetgate::protocol::imei::encode_login;
use fleetgate::protocol::{Codec, Imei};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::frames::{FrameGen, Rng};
use crate::stats::Stats;

/// How long a connection attempt plus login may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause after a failed connection attempt; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Pause after a login answered `00`.
const REJECT_PAUSE: Duration = Duration::from_secs(1);

/// What every device of the run shares: the options and the run's clock.
pub struct Plan {
    pub addr: SocketAddr,
    pub codec: Codec,
    pub records_per_frame: usize,
    pub io_per_record: usize,
    /// Frames per device sent and not yet acked, at most.
    pub in_flight: usize,
    /// Time between a device's frames; `None`: closed loop.
    pub interval: Option<Duration>,
    /// A frame whose ack has not come after this long is given up on (TCP: reconnect and
    /// resend; UDP: resend).
    pub ack_timeout: Duration,
    pub imei_base: u64,
    /// First record timestamp of the run, ms since the Unix epoch.
    pub ts_base: u64,
    /// Acks from here on count for the histogram and the rate.
    pub measure_from: Instant,
    /// No new frames from here on.
    pub send_until: Instant,
    /// Outstanding acks are waited for until here; then every device stops.
    pub drain_until: Instant,
    pub stats: Stats,
}

/// A frame sent and not yet acked.
struct Pending {
    bytes: Vec<u8>,
    records: u32,
    /// UDP packet id (unused over TCP).
    packet_id: u16,
    /// Latency counts from here: the send (closed loop) or the schedule (`--rate`).
    t_ref: Instant,
    /// Last time its bytes were written: the ack timeout counts from here.
    sent_at: Instant,
}

/// Why a TCP session ended.
enum End {
    /// The run is over for this device.
    Done,
    /// The connection broke (or was given up on): reconnect and resend.
    Lost,
}

/// State common to the TCP and UDP devices.
struct Device {
    plan: Arc<Plan>,
    idx: usize,
    imei: Imei,
    gen: FrameGen,
    rng: Rng,
    pending: VecDeque<Pending>,
    /// Buffers of acked frames, for reuse.
    free: Vec<Vec<u8>>,
    /// `--rate`: when the next frame is due.
    next_due: Option<Instant>,
}

impl Device {
    fn new(plan: Arc<Plan>, idx: usize) -> Device {
        let imei = Imei::new(plan.imei_base + idx as u64).expect("IMEI range checked by main");
        // A device-specific offset keeps devices from sharing timestamps, for readability of
        // the stored rows; uniqueness comes from the IMEI and the per-device sequence.
        let first_ts = plan.ts_base + (idx as u64 % 1000);
        let gen = FrameGen::new(
            plan.codec,
            imei,
            first_ts,
            plan.records_per_frame,
            plan.io_per_record,
            imei.as_u64(),
        );
        Device {
            rng: Rng::new(imei.as_u64() ^ 0x5eed),
            plan,
            idx,
            imei,
            gen,
            pending: VecDeque::new(),
            free: Vec::new(),
            next_due: None,
        }
    }

    /// Starts the `--rate` schedule at a random phase, so devices do not send in lockstep.
    fn start_schedule(&mut self, at: Instant) {
        if let Some(iv) = self.plan.interval {
            self.next_due = Some(at + iv.mul_f64(self.rng.unit()));
        }
    }

    /// The reference time of a frame that may be sent now, if one may: the window has room
    /// and (with `--rate`) a frame is due. Advances the schedule.
    fn take_due(&mut self, now: Instant) -> Option<Instant> {
        if now >= self.plan.send_until || self.pending.len() >= self.plan.in_flight {
            return None;
        }
        match (self.next_due, self.plan.interval) {
            (Some(due), Some(iv)) if due <= now => {
                self.next_due = Some(due + iv);
                Some(due)
            }
            (Some(_), _) => None,
            (None, _) => Some(now),
        }
    }

    /// When the device must next look up from waiting for acks.
    fn wake_at(&self, now: Instant) -> Instant {
        let p = &self.plan;
        let mut wake = p.drain_until;
        if now < p.send_until {
            wake = wake.min(p.send_until);
            if self.pending.len() < p.in_flight {
                if let Some(due) = self.next_due {
                    wake = wake.min(due);
                }
            }
        }
        if let Some(oldest) = self.pending.iter().map(|f| f.sent_at).min() {
            wake = wake.min(oldest + p.ack_timeout);
        }
        wake
    }

    /// Whether the device is finished: the run is over, or sending stopped and nothing is
    /// waiting for an ack.
    fn finished(&self, now: Instant) -> bool {
        now >= self.plan.drain_until || (now >= self.plan.send_until && self.pending.is_empty())
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Books a frame acked with the right count.
    fn acked(&mut self, f: Pending, now: Instant) {
        let p = &self.plan;
        let s = &p.stats;
        Stats::add(&s.frames_acked, 1);
        Stats::add(&s.records_acked, f.records as u64);
        let us = now.saturating_duration_since(f.t_ref).as_micros() as u64;
        s.record_latency(self.idx, us, f.t_ref >= p.measure_from);
        if now >= p.measure_from && now < p.send_until {
            Stats::add(&s.window_frames, 1);
            Stats::add(&s.window_records, f.records as u64);
        }
        if self.free.len() < p.in_flight {
            self.free.push(f.bytes);
        }
    }

    /// Books what is left at the end.
    fn finish(&self) {
        let s = &self.plan.stats;
        Stats::add(&s.unacked_frames, self.pending.len() as u64);
        Stats::add(
            &s.unacked_records,
            self.pending.iter().map(|f| f.records as u64).sum(),
        );
        s.max_ts
            .fetch_max(self.gen.next_ts().saturating_sub(1), Ordering::Relaxed);
    }

    /// Sleeps for `d` plus up to 50% jitter, but not past the end of the run.
    async fn pause(&mut self, d: Duration) {
        let d = d + d.mul_f64(self.rng.unit() * 0.5);
        sleep_until((Instant::now() + d).min(self.plan.drain_until)).await;
    }
}

/// Why a connection attempt failed.
enum ConnectError {
    /// The gateway answered the login with `00`.
    Rejected,
    /// Connect, login write or reply failed or timed out.
    Failed,
}

/// Connects and logs in; `Ok` once the gateway has answered `01`.
async fn connect_tcp(
    addr: SocketAddr,
    imei: Imei,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let mut s = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => return Err(ConnectError::Failed),
    };
    let _ = s.set_nodelay(true);
    let mut login = Vec::with_capacity(17);
    encode_login(imei, &mut login);
    if !matches!(timeout_at(deadline, s.write_all(&login)).await, Ok(Ok(()))) {
        return Err(ConnectError::Failed);
    }
    let mut reply = [0u8; 1];
    match timeout_at(deadline, s.read_exact(&mut reply)).await {
        Ok(Ok(_)) if reply[0] == 0x01 => Ok(s),
        Ok(Ok(_)) if reply[0] == 0x00 => Err(ConnectError::Rejected),
        _ => Err(ConnectError::Failed),
    }
}

/// Writes all of `bytes` by `deadline`.
async fn write_by(wr: &mut OwnedWriteHalf, bytes: &[u8], deadline: Instant) -> bool {
    matches!(timeout_at(deadline, wr.write_all(bytes)).await, Ok(Ok(())))
}

/// A TCP device: device number `idx` of the run, first connecting at `start_at`.
pub async fn run_tcp(plan: Arc<Plan>, idx: usize, start_at: Instant) {
    let mut d = Device::new(plan.clone(), idx);
    sleep_until(start_at).await;
    d.start_schedule(start_at);
    let s = &plan.stats;
    let mut logged_in_before = false;
    let mut backoff = BACKOFF_MIN;
    while !d.finished(Instant::now()) {
        let deadline = (Instant::now() + CONNECT_TIMEOUT).min(plan.drain_until);
        match connect_tcp(plan.addr, d.imei, deadline).await {
            Ok(stream) => {
                backoff = BACKOFF_MIN;
                Stats::add(
                    if logged_in_before {
                        &s.reconnects
                    } else {
                        &s.logged_in
                    },
                    1,
                );
                logged_in_before = true;
                match tcp_session(&mut d, stream).await {
                    End::Done => break,
                    End::Lost => d.pause(Duration::from_millis(50)).await,
                }
            }
            Err(ConnectError::Rejected) => {
                Stats::add(&s.login_rejects, 1);
                d.pause(REJECT_PAUSE).await;
            }
            Err(ConnectError::Failed) => {
                Stats::add(&s.connect_errors, 1);
                d.pause(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    d.finish();
}

/// One logged-in connection: resend what is unacked, then stream frames and read acks until
/// the run ends or the connection breaks.
async fn tcp_session(d: &mut Device, stream: TcpStream) -> End {
    let plan = d.plan.clone();
    let s = &plan.stats;
    let (mut rd, mut wr): (OwnedReadHalf, OwnedWriteHalf) = stream.into_split();
    for f in d.pending.iter_mut() {
        let now = Instant::now();
        if plan.interval.is_none() {
            f.t_ref = now;
        }
        f.sent_at = now;
        Stats::add(&s.resends, 1);
        if !write_by(
            &mut wr,
            &f.bytes,
            (now + plan.ack_timeout).min(plan.drain_until),
        )
        .await
        {
            return End::Lost;
        }
    }
    let mut buf = [0u8; 512];
    let mut have = 0usize;
    loop {
        let now = Instant::now();
        if d.finished(now) {
            return End::Done;
        }
        if let Some(t_ref) = d.take_due(now) {
            let mut bytes = d.buffer();
            d.gen.next_tcp_frame(&mut bytes);
            Stats::add(&s.frames_sent, 1);
            let records = d.gen.records_per_frame() as u32;
            let ok = write_by(
                &mut wr,
                &bytes,
                (now + plan.ack_timeout).min(plan.drain_until),
            )
            .await;
            d.pending.push_back(Pending {
                bytes,
                records,
                packet_id: 0,
                t_ref,
                sent_at: now,
            });
            if !ok {
                return End::Lost;
            }
            continue;
        }
        let wake = d.wake_at(now);
        tokio::select! {
            r = rd.read(&mut buf[have..]) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(n) => n,
                };
                have += n;
                let now = Instant::now();
                let mut at = 0;
                while have - at >= 4 {
                    let count = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
                    at += 4;
                    match d.pending.pop_front() {
                        Some(f) if f.records == count => d.acked(f, now),
                        Some(f) => {
                            // A device keeps records acked with a wrong count and sends them
                            // again; the positional acks that follow cannot be trusted.
                            Stats::add(&s.errors, 1);
                            d.pending.push_front(f);
                            return End::Lost;
                        }
                        None => Stats::add(&s.errors, 1),
                    }
                }
                buf.copy_within(at..have, 0);
                have -= at;
            }
            () = sleep_until(wake) => {
                let now = Instant::now();
                if d.pending.front().is_some_and(|f| f.sent_at + plan.ack_timeout <= now) {
                    Stats::add(&s.ack_timeouts, 1);
                    return End::Lost;
                }
            }
        }
    }
}

/// A UDP device: its own socket, datagrams acked by packet id (in any order), and a resend
/// of any datagram whose ack has not come within the ack timeout.
pub async fn run_udp(plan: Arc<Plan>, idx: usize, start_at: Instant) {
    let mut d = Device::new(plan.clone(), idx);
    let s = &plan.stats;
    sleep_until(start_at).await;
    d.start_schedule(start_at);
    let local: SocketAddr = if plan.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match UdpSocket::bind(local).await {
        Ok(sock) if sock.connect(plan.addr).await.is_ok() => sock,
        _ => {
            Stats::add(&s.connect_errors, 1);
            d.finish();
            return;
        }
    };
    Stats::add(&s.logged_in, 1);
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if d.finished(now) {
            break;
        }
        if let Some(t_ref) = d.take_due(now) {
            let mut bytes = d.buffer();
            let packet_id = d.gen.next_datagram(&mut bytes);
            Stats::add(&s.frames_sent, 1);
            let records = d.gen.records_per_frame() as u32;
            // A failed send is like a lost datagram: the ack timeout resends it.
            let _ = sock.send(&bytes).await;
            d.pending.push_back(Pending {
                bytes,
                records,
                packet_id,
                t_ref,
                sent_at: now,
            });
            continue;
        }
        let wake = d.wake_at(now);
        tokio::select! {
            r = sock.recv(&mut buf) => {
                let now = Instant::now();
                match r {
                    Ok(7) if buf[..2] == [0x00, 0x05] && buf[4] == 0x01 => {
                        let pid = u16::from_be_bytes([buf[2], buf[3]]);
                        if let Some(i) = d.pending.iter().position(|f| f.packet_id == pid) {
                            if d.pending[i].records == buf[6] as u32 {
                                let f = d.pending.remove(i).expect("index from position");
                                d.acked(f, now);
                            } else {
                                // Not acked: it goes again when its ack times out.
                                Stats::add(&s.errors, 1);
                            }
                        }
                        // An ack for no pending datagram is the second ack of a resend.
                    }
                    Ok(_) => Stats::add(&s.errors, 1),
                    // ICMP port unreachable and the like: the gateway is not there (yet).
                    Err(_) => d.pause(Duration::from_millis(20)).await,
                }
            }
            () = sleep_until(wake) => {
                let now = Instant::now();
                for f in d.pending.iter_mut().filter(|f| f.sent_at + plan.ack_timeout <= now) {
                    Stats::add(&s.ack_timeouts, 1);
                    Stats::add(&s.resends, 1);
                    if plan.interval.is_none() {
                        f.t_ref = now;
                    }
                    f.sent_at = now;
                    let _ = sock.send(&f.bytes).await;
                }
            }
        }
    }
    d.finish();
}
