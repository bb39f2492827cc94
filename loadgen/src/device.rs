//! One simulated device: a tokio task that connects, logs in, streams frames and waits for
//! their acks, the way a Teltonika tracker does. The device is the buffer: frames stay in
//! its queue until acked, and a lost connection is re-established and the unacked frames are
//! sent again, byte for byte. It also answers the Codec 12/14 commands the gateway sends it,
//! and a `--drop-fraction` of devices cut their connection mid-frame now and then.
//!
//! Latency is measured per frame from send to ack. In open loop (`--rate`), it counts from
//! the frame's scheduled time instead, so time spent waiting for a free in-flight slot (or a
//! connection) shows up as latency rather than as silently missed load.
//!
//! Every connection attempt, first or not, waits for a token of the run's [`TokenBucket`]
//! (`--connect-rate`) and a failed one is retried after an exponential [`Backoff`]: a fleet
//! that loses its gateway comes back as a paced stream, not as one burst of SYNs.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate::protocol::command::{TYPE_COMMAND, TYPE_REFUSED, TYPE_RESPONSE};
use fleetgate::protocol::imei::encode_login;
use fleetgate::protocol::tcp::encode_command_frame;
use fleetgate::protocol::{
    decode_frame, Codec, CommandFrame, Frame, Imei, Status, DEFAULT_MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::frames::{FrameGen, Rng};
use crate::pacing::{Backoff, TokenBucket};
use crate::stats::{ConnectErrorKind, Stats};

/// First pause after a failed connection attempt; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Pause after a login answered `00`.
const REJECT_PAUSE: Duration = Duration::from_secs(1);
/// Pause before reconnecting after a lost or dropped connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Longest command payload echoed back in an answer.
const MAX_ECHO: usize = 512;

/// What every device of the run shares: the options, the run's clock, the connect pacing.
pub struct Plan {
    pub addr: SocketAddr,
    pub codec: Codec,
    pub records_per_frame: usize,
    pub io_per_record: usize,
    /// Frames per device sent and not yet acked, at most.
    pub in_flight: usize,
    /// Devices of this process.
    pub devices: u64,
    /// Time between a device's frames; `None`: closed loop.
    pub interval: Option<Duration>,
    /// A frame whose ack has not come after this long is given up on (TCP: reconnect and
    /// resend; UDP: resend).
    pub ack_timeout: Duration,
    /// How long a connect plus login may take.
    pub connect_timeout: Duration,
    pub imei_base: u64,
    /// First record timestamp of the run, ms since the Unix epoch.
    pub ts_base: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(n+1) spread over the devices; 0: the kernel's
    /// choice (127.0.0.1 towards a loopback gateway).
    pub source_addrs: u8,
    /// Fraction of devices that cut their connection now and then.
    pub drop_fraction: f64,
    /// Mean time between two cuts of such a device.
    pub drop_interval: Duration,
    /// How long a device takes to answer a command.
    pub command_delay: Duration,
    /// Acks from here on count for the histogram and the rate.
    pub measure_from: Instant,
    /// No new frames from here on.
    pub send_until: Instant,
    /// Outstanding acks are waited for until here; then every device stops.
    pub drain_until: Instant,
    /// Paces every connection attempt of this process (`--connect-rate`).
    pub connects: Mutex<TokenBucket>,
    pub stats: Stats,
}

impl Plan {
    /// Waits for this device's turn to attempt a connection; `false` if the run ends first.
    async fn connect_turn(&self) -> bool {
        let at = {
            let mut b = self.connects.lock().unwrap_or_else(|e| e.into_inner());
            b.reserve(Instant::now().into_std())
        };
        let at = Instant::from_std(at);
        sleep_until(at.min(self.drain_until)).await;
        at < self.drain_until
    }

    /// The address device `idx` binds its sockets to, if `--source-addrs` asks for one.
    fn source_ip(&self, idx: usize) -> Option<IpAddr> {
        (self.source_addrs > 0 && self.addr.is_ipv4()).then(|| {
            let host = 2 + (idx % self.source_addrs as usize) as u8;
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))
        })
    }
}

/// Whether device `idx` is one of the `fraction` that drop their connection: exactly
/// `floor(n * fraction)` of the first `n` devices are, evenly spread (not the first ones, so
/// every process of a `--processes` run gets its part).
pub fn is_dropper(idx: usize, fraction: f64) -> bool {
    let f = fraction.clamp(0.0, 1.0);
    ((idx + 1) as f64 * f).floor() > (idx as f64 * f).floor()
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
    /// The connection broke (or was given up on, or cut on purpose): reconnect and resend.
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
    /// `--drop-fraction`: when this device next cuts its connection (`None`: never).
    next_drop: Option<Instant>,
    dropper: bool,
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
            dropper: is_dropper(idx, plan.drop_fraction),
            plan,
            idx,
            imei,
            gen,
            pending: VecDeque::new(),
            free: Vec::new(),
            next_due: None,
            next_drop: None,
        }
    }

    /// Starts the `--rate` schedule at a random phase, so devices do not send in lockstep.
    fn start_schedule(&mut self, at: Instant) {
        if let Some(iv) = self.plan.interval {
            self.next_due = Some(at + iv.mul_f64(self.rng.unit()));
        }
    }

    /// A dropping device picks when it next cuts its connection: around `--drop-interval`.
    fn schedule_drop(&mut self, now: Instant) {
        if self.dropper {
            let d = self.plan.drop_interval.mul_f64(0.5 + self.rng.unit());
            self.next_drop = Some(now + d);
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

    /// Sleeps for `d`, but not past the end of the run.
    async fn pause(&mut self, d: Duration) {
        sleep_until((Instant::now() + d).min(self.plan.drain_until)).await;
    }

    /// `d` plus up to 50% jitter.
    fn jitter(&mut self, d: Duration) -> Duration {
        d + d.mul_f64(self.rng.unit() * 0.5)
    }
}

/// Why a connection attempt failed.
enum LoginError {
    /// The gateway answered the login with `00`.
    Refused,
    /// Connect, login write or reply failed or timed out.
    Failed(ConnectErrorKind),
}

/// Asks the kernel to pick the source port at `connect` rather than at `bind`, so that the
/// port need only be unique per (source, destination) pair: without it a bound socket takes a
/// port out of the source address's whole ephemeral range.
fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP connection to `addr`, from `source` when given.
async fn open_tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        bind_address_no_port(&sock)?;
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Connects and logs in; `Ok` once the gateway has answered `01`.
async fn connect_tcp(
    plan: &Plan,
    idx: usize,
    imei: Imei,
    deadline: Instant,
) -> Result<TcpStream, LoginError> {
    let failed = |e: io::Error| LoginError::Failed(ConnectErrorKind::of(&e));
    let timed_out = |_| LoginError::Failed(ConnectErrorKind::Timeout);
    let mut s = timeout_at(deadline, open_tcp(plan.addr, plan.source_ip(idx)))
        .await
        .map_err(timed_out)?
        .map_err(failed)?;
    let mut login = Vec::with_capacity(17);
    encode_login(imei, &mut login);
    timeout_at(deadline, s.write_all(&login))
        .await
        .map_err(timed_out)?
        .map_err(failed)?;
    let mut reply = [0u8; 1];
    timeout_at(deadline, s.read_exact(&mut reply))
        .await
        .map_err(timed_out)?
        .map_err(failed)?;
    match reply[0] {
        0x01 => Ok(s),
        0x00 => Err(LoginError::Refused),
        _ => Err(LoginError::Failed(ConnectErrorKind::Other)),
    }
}

/// Writes all of `bytes` by `deadline`.
async fn write_by(wr: &mut OwnedWriteHalf, bytes: &[u8], deadline: Instant) -> bool {
    matches!(timeout_at(deadline, wr.write_all(bytes)).await, Ok(Ok(())))
}

/// A TCP device: device number `idx` of the process, starting at `t0`.
pub async fn run_tcp(plan: Arc<Plan>, idx: usize, t0: Instant) {
    let mut d = Device::new(plan.clone(), idx);
    sleep_until(t0).await;
    let s = &plan.stats;
    let mut logged_in_before = false;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    while !d.finished(Instant::now()) {
        if !plan.connect_turn().await || d.finished(Instant::now()) {
            break;
        }
        Stats::add(&s.connect_attempts, 1);
        let deadline = (Instant::now() + plan.connect_timeout).min(plan.drain_until);
        match connect_tcp(&plan, idx, d.imei, deadline).await {
            Ok(stream) => {
                backoff.reset();
                let now = Instant::now();
                if logged_in_before {
                    Stats::add(&s.reconnects, 1);
                } else {
                    Stats::add(&s.logged_in, 1);
                    d.start_schedule(now);
                    logged_in_before = true;
                }
                d.schedule_drop(now);
                Stats::add(&s.connected, 1);
                let end = tcp_session(&mut d, stream).await;
                s.connected.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::Done => break,
                    End::Lost => {
                        let p = d.jitter(RECONNECT_PAUSE);
                        d.pause(p).await;
                    }
                }
            }
            Err(LoginError::Refused) => {
                Stats::add(&s.logins_refused, 1);
                let p = d.jitter(REJECT_PAUSE);
                d.pause(p).await;
            }
            Err(LoginError::Failed(kind)) => {
                s.connect_failed(kind);
                let p = backoff.next_delay(d.rng.unit());
                d.pause(p).await;
            }
        }
    }
    if !logged_in_before {
        Stats::add(&s.never_connected, 1);
    }
    d.finish();
}

/// One item of the gateway-to-device TCP stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downlink<'a> {
    /// A record ack: how many records of the oldest unacked frame were stored.
    Ack(u32),
    /// A command-family frame (Codec 12/14 command).
    Command(CommandFrame<'a>),
}

/// Decodes the first item the gateway sent: a 4-byte record ack, or a command frame, which
/// starts with four zero bytes (an ack never counts zero records).
///
/// # Errors
/// Bytes that are neither: the stream cannot be trusted past them.
pub fn parse_downlink(buf: &[u8]) -> Result<Status<(Downlink<'_>, usize)>, String> {
    if buf.len() < 4 {
        return Ok(Status::Partial(4 - buf.len()));
    }
    if buf[..4] != [0; 4] {
        let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        return Ok(Status::Complete((Downlink::Ack(n), 4)));
    }
    match decode_frame(buf, DEFAULT_MAX_FRAME_LEN).map_err(|e| e.to_string())? {
        Status::Partial(n) => Ok(Status::Partial(n)),
        Status::Complete((Frame::Command(c), used)) => {
            Ok(Status::Complete((Downlink::Command(c), used)))
        }
        Status::Complete((other, _)) => {
            Err(format!("unexpected frame from the gateway: {other:?}"))
        }
    }
}

/// Appends device `imei`'s answer to `cmd`, as a tracker gives it: Codec 12 answers with a
/// response echoing the command; Codec 14 answers with a response when the command names
/// this device and with a refusal (`0x11`) when it names another. `false`: the frame is not
/// a command and gets no answer.
pub fn answer_command(cmd: &CommandFrame<'_>, imei: Imei, out: &mut Vec<u8>) -> bool {
    if cmd.kind != TYPE_COMMAND {
        return false;
    }
    let echo = &cmd.payload[..cmd.payload.len().min(MAX_ECHO)];
    let mut text = b"loadgen ok: ".to_vec();
    text.extend_from_slice(echo);
    match cmd.codec {
        Codec::C12 => encode_command_frame(Codec::C12, TYPE_RESPONSE, None, &text, out),
        Codec::C14 if cmd.imei() == Some(imei) => {
            encode_command_frame(Codec::C14, TYPE_RESPONSE, Some(imei), &text, out)
        }
        Codec::C14 => encode_command_frame(Codec::C14, TYPE_REFUSED, Some(imei), &[], out),
        _ => return false,
    }
    true
}

/// One logged-in connection: resend what is unacked, then stream frames, read acks and
/// answer commands until the run ends or the connection breaks (or is cut on purpose).
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
    // Acks are 4 bytes; the buffer grows only for a command frame that needs it.
    let mut buf = vec![0u8; 512];
    let mut have = 0usize;
    // Answers to commands, each with the time it is due.
    let mut answers: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    loop {
        let now = Instant::now();
        if d.finished(now) {
            return End::Done;
        }
        if answers.front().is_some_and(|(due, _)| *due <= now) {
            let (_, bytes) = answers.pop_front().expect("front checked");
            if !write_by(
                &mut wr,
                &bytes,
                (now + plan.ack_timeout).min(plan.drain_until),
            )
            .await
            {
                return End::Lost;
            }
            Stats::add(&s.commands_answered, 1);
            continue;
        }
        if let Some(t_ref) = d.take_due(now) {
            let mut bytes = d.buffer();
            d.gen.next_tcp_frame(&mut bytes);
            Stats::add(&s.frames_sent, 1);
            let records = d.gen.records_per_frame() as u32;
            // A dropping device cuts the line half-way through a frame, as a tracker losing
            // coverage does: the frame stays unacked and goes again after the reconnect.
            let cut = d.next_drop.is_some_and(|t| now >= t);
            let len = if cut { bytes.len() / 2 } else { bytes.len() };
            let ok = write_by(
                &mut wr,
                &bytes[..len],
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
            if cut {
                Stats::add(&s.drops, 1);
                return End::Lost;
            }
            if !ok {
                return End::Lost;
            }
            continue;
        }
        let mut wake = d.wake_at(now);
        if let Some((due, _)) = answers.front() {
            wake = wake.min(*due);
        }
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        tokio::select! {
            r = rd.read(&mut buf[have..]) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(n) => n,
                };
                have += n;
                let now = Instant::now();
                let mut at = 0;
                loop {
                    match parse_downlink(&buf[at..have]) {
                        Ok(Status::Partial(need)) => {
                            let want = have - at + need;
                            if want > buf.len() {
                                buf.resize(want, 0);
                            }
                            break;
                        }
                        Ok(Status::Complete((Downlink::Ack(count), used))) => {
                            at += used;
                            match d.pending.pop_front() {
                                Some(f) if f.records == count => d.acked(f, now),
                                Some(f) => {
                                    // A device keeps records acked with a wrong count and
                                    // sends them again; the positional acks that follow
                                    // cannot be trusted.
                                    Stats::add(&s.bad_acks, 1);
                                    d.pending.push_front(f);
                                    return End::Lost;
                                }
                                None => Stats::add(&s.bad_acks, 1),
                            }
                        }
                        Ok(Status::Complete((Downlink::Command(cmd), used))) => {
                            Stats::add(&s.commands_received, 1);
                            let mut answer = Vec::new();
                            if answer_command(&cmd, d.imei, &mut answer) {
                                answers.push_back((now + plan.command_delay, answer));
                            }
                            at += used;
                        }
                        Err(_) => {
                            Stats::add(&s.bad_acks, 1);
                            return End::Lost;
                        }
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
/// of any datagram whose ack has not come within the ack timeout. Its first datagram waits
/// for a `--connect-rate` token like a TCP connect does.
pub async fn run_udp(plan: Arc<Plan>, idx: usize, t0: Instant) {
    let mut d = Device::new(plan.clone(), idx);
    let s = &plan.stats;
    sleep_until(t0).await;
    if !plan.connect_turn().await {
        Stats::add(&s.never_connected, 1);
        d.finish();
        return;
    }
    Stats::add(&s.connect_attempts, 1);
    let local: SocketAddr = match plan.source_ip(idx) {
        Some(ip) => SocketAddr::new(ip, 0),
        None if plan.addr.is_ipv4() => ([0, 0, 0, 0], 0).into(),
        None => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = match UdpSocket::bind(local).await {
        Ok(sock) => match sock.connect(plan.addr).await {
            Ok(()) => sock,
            Err(e) => {
                s.connect_failed(ConnectErrorKind::of(&e));
                Stats::add(&s.never_connected, 1);
                d.finish();
                return;
            }
        },
        Err(e) => {
            s.connect_failed(ConnectErrorKind::of(&e));
            Stats::add(&s.never_connected, 1);
            d.finish();
            return;
        }
    };
    Stats::add(&s.logged_in, 1);
    Stats::add(&s.connected, 1);
    d.start_schedule(Instant::now());
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
                                Stats::add(&s.bad_acks, 1);
                            }
                        }
                        // An ack for no pending datagram is the second ack of a resend.
                    }
                    Ok(_) => Stats::add(&s.bad_acks, 1),
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
    s.connected.fetch_sub(1, Ordering::Relaxed);
    d.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate::protocol::tcp::encode_record_ack;

    fn imei() -> Imei {
        Imei::new(350_000_000_000_007).unwrap()
    }

    #[test]
    fn droppers_are_the_requested_fraction_spread_out() {
        let n = 1000;
        let count = |f: f64| (0..n).filter(|&i| is_dropper(i, f)).count();
        assert_eq!(count(0.0), 0);
        assert_eq!(count(0.1), 100);
        assert_eq!(count(0.25), 250);
        assert_eq!(count(1.0), 1000);
        // Spread: every block of 10 devices holds one at 10 %.
        for block in 0..100 {
            let k = (block * 10..block * 10 + 10)
                .filter(|&i| is_dropper(i, 0.1))
                .count();
            assert_eq!(k, 1, "block {block}");
        }
    }

    #[test]
    fn downlink_splits_acks_and_commands() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&encode_record_ack(10));
        encode_command_frame(Codec::C12, TYPE_COMMAND, None, b"getinfo", &mut stream);
        stream.extend_from_slice(&encode_record_ack(65536));
        let mut at = 0;
        let mut items = Vec::new();
        while at < stream.len() {
            let used = match parse_downlink(&stream[at..]).unwrap() {
                Status::Complete((item, used)) => {
                    items.push(format!("{item:?}"));
                    used
                }
                Status::Partial(n) => panic!("partial {n} at {at}"),
            };
            // Any prefix of the item is partial, never mistaken for something else.
            for end in at..at + used {
                assert!(
                    matches!(parse_downlink(&stream[at..end]), Ok(Status::Partial(_))),
                    "prefix {at}..{end}"
                );
            }
            at += used;
        }
        assert_eq!(items.len(), 3);
        assert!(items[0].contains("Ack(10)"));
        assert!(items[1].contains("Command"));
        assert!(items[2].contains("Ack(65536)"));
        assert!(parse_downlink(&[0, 0, 0, 0, 0, 0, 0, 9, 0x08]).is_ok());
        assert!(parse_downlink(&[0, 0, 0, 1, 2]).is_ok());
        let mut bad = Vec::new();
        encode_command_frame(Codec::C12, TYPE_COMMAND, None, b"x", &mut bad);
        let last = bad.len() - 1;
        bad[last] ^= 1; // the CRC
        assert!(parse_downlink(&bad).is_err());
    }

    fn decode_command(bytes: &[u8]) -> CommandFrame<'_> {
        match decode_frame(bytes, DEFAULT_MAX_FRAME_LEN).unwrap() {
            Status::Complete((Frame::Command(c), used)) => {
                assert_eq!(used, bytes.len());
                c
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_get_a_codec_12_response() {
        let mut cmd = Vec::new();
        encode_command_frame(Codec::C12, TYPE_COMMAND, None, b"setdigout 1", &mut cmd);
        let c = decode_command(&cmd);
        let mut out = Vec::new();
        assert!(answer_command(&c, imei(), &mut out));
        let a = decode_command(&out);
        assert_eq!((a.codec, a.kind), (Codec::C12, TYPE_RESPONSE));
        assert_eq!(a.text(), Some("loadgen ok: setdigout 1"));
    }

    #[test]
    fn codec_14_commands_are_answered_only_for_this_device() {
        let mut out = Vec::new();
        let mut cmd = Vec::new();
        encode_command_frame(Codec::C14, TYPE_COMMAND, Some(imei()), b"getver", &mut cmd);
        assert!(answer_command(&decode_command(&cmd), imei(), &mut out));
        let a = decode_command(&out);
        assert_eq!(
            (a.codec, a.kind, a.imei()),
            (Codec::C14, TYPE_RESPONSE, Some(imei()))
        );

        let other = Imei::new(350_000_000_000_008).unwrap();
        let (mut cmd, mut out) = (Vec::new(), Vec::new());
        encode_command_frame(Codec::C14, TYPE_COMMAND, Some(other), b"getver", &mut cmd);
        assert!(answer_command(&decode_command(&cmd), imei(), &mut out));
        assert_eq!(decode_command(&out).kind, TYPE_REFUSED);

        // A response is not a command: no answer to it.
        let (mut rsp, mut out) = (Vec::new(), Vec::new());
        encode_command_frame(Codec::C12, TYPE_RESPONSE, None, b"x", &mut rsp);
        assert!(!answer_command(&decode_command(&rsp), imei(), &mut out));
        assert!(out.is_empty());
    }
}
