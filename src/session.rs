//! PURE: a device's TCP session as a sans-IO state machine (quinn-proto's way).
//!
//! The session is handed what happened (bytes read, a commit outcome, a finished write, the
//! time) and answers with what to do: [`Session::poll_input`] says which item the buffered
//! bytes hold (a login to decide, AVL records to submit), [`Session::poll_transmit`] what to
//! write, [`Session::poll_timeout`] when to wake it, and [`Session::finished`] when and why the
//! connection ends. It owns no socket, buffer, task or clock, so every rule of a session is a
//! unit test without sockets:
//!
//! - login first: pings may precede it; a bad IMEI is answered `00`; anything else closes;
//! - acks in frame order, each only after its frame's commit; after a refused frame nothing
//!   more is acked (acks are positional) and the session ends;
//! - at most `max_frames_in_flight` frames between decode and their ack being written: beyond
//!   that the session asks for no more input, which stops the device;
//! - the login timeout, the idle timeout (only while neither side owes the other anything),
//!   and the write timeout (a device that does not read its acks);
//! - closing: graceful (stop reading, ack what commits, then end) or at once (replaced,
//!   disabled, shutdown deadline), each with a typed [`CloseReason`].
//!
//! The glommio driver around it (`conn::tcp`) only moves bytes and waits.

use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::protocol::command::{TYPE_REFUSED, TYPE_RESPONSE};
use crate::protocol::imei::{LOGIN_ACCEPT, LOGIN_REJECT};
use crate::protocol::{
    decode_frame, encode_record_ack, AvlData, CommandFrame, DecodeError, Frame, Imei, Status,
};
use crate::sink::WriteOutcome;

/// The limits a session works within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub max_frame_len: u32,
    pub max_frames_in_flight: usize,
    pub login_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// How long the device may take to answer a command.
    pub command_timeout: Duration,
}

/// Why a session ended. `Display` is the text stored in `device_sessions.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    ClosedByPeer,
    ReadError,
    LoginTimeout,
    /// The login was not a valid IMEI (answered `00`).
    BadLogin(DecodeError),
    /// The device policy refused the IMEI (answered `00`).
    LoginRefused,
    /// A complete non-login item arrived before the login.
    DataBeforeLogin,
    BadFrame(DecodeError),
    SecondLogin,
    IdleTimeout,
    /// An ack could not be written in `write_timeout`: the device does not read.
    WriteTimeout,
    WriteFailed,
    /// The database refused a frame's records for good.
    RecordsRefused,
    /// The writer is gone (the gateway is failing).
    WriterGone,
    Replaced,
    DeviceDisabled,
    Shutdown,
    /// The shard refused to adopt the connection (its connection cap).
    ConnectionLimit,
    /// The driver broke the session's contract (a bug): this one session ends, unacked frames
    /// are the device's to resend, and the shard goes on.
    Internal,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ClosedByPeer => f.write_str("closed by peer"),
            CloseReason::ReadError => f.write_str("read error"),
            CloseReason::LoginTimeout => f.write_str("login timeout"),
            CloseReason::BadLogin(e) => write!(f, "bad login: {e}"),
            CloseReason::LoginRefused => f.write_str("login refused by the device policy"),
            CloseReason::DataBeforeLogin => f.write_str("data before login"),
            CloseReason::BadFrame(e) => write!(f, "bad frame: {e}"),
            CloseReason::SecondLogin => f.write_str("second login on a session"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::WriteTimeout => f.write_str("write timeout: device does not read"),
            CloseReason::WriteFailed => f.write_str("ack write failed"),
            CloseReason::RecordsRefused => f.write_str("records refused by the database"),
            CloseReason::WriterGone => f.write_str("writer unavailable"),
            CloseReason::Replaced => f.write_str("replaced by a new connection"),
            CloseReason::DeviceDisabled => f.write_str("device disabled"),
            CloseReason::Shutdown => f.write_str("gateway shutdown"),
            CloseReason::ConnectionLimit => f.write_str("connection limit reached"),
            CloseReason::Internal => f.write_str("internal error"),
        }
    }
}

impl CloseReason {
    /// A short stable name, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CloseReason::ClosedByPeer => "closed_by_peer",
            CloseReason::ReadError => "read_error",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::BadLogin(_) => "bad_login",
            CloseReason::LoginRefused => "login_refused",
            CloseReason::DataBeforeLogin => "data_before_login",
            CloseReason::BadFrame(_) => "bad_frame",
            CloseReason::SecondLogin => "second_login",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::RecordsRefused => "records_refused",
            CloseReason::WriterGone => "writer_gone",
            CloseReason::Replaced => "replaced",
            CloseReason::DeviceDisabled => "device_disabled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ConnectionLimit => "connection_limit",
            CloseReason::Internal => "internal",
        }
    }
}

/// What the buffered bytes hold, from [`Session::poll_input`]. `used` bytes of the buffer
/// belong to the item: the driver consumes them once it has handled it.
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// Nothing to do until more bytes arrive.
    NeedBytes,
    /// Reading is paused: frames in flight are at the limit, or the session is closing.
    Paused,
    /// A keep-alive byte.
    Ping { used: usize },
    /// The login: answer [`Session::accept_login`] or [`Session::refuse_login`] (or hand the
    /// connection to the device's owning shard, which accepts it there).
    Login { imei: Imei, used: usize },
    /// AVL records to submit to the writer; report the outcome with [`Session::on_commit`]
    /// and this `seq`.
    Avl {
        seq: u64,
        avl: AvlData<'a>,
        used: usize,
    },
    /// The device's answer to the command in flight (a response, or a Codec 14 refusal).
    CommandAnswer {
        id: i64,
        frame: CommandFrame<'a>,
        used: usize,
    },
    /// A command-family frame that answers nothing (a Codec 13/15 message, camera data, or a
    /// response when no command is in flight).
    Command {
        frame: CommandFrame<'a>,
        used: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitLogin,
    /// A login was decoded; the driver decides.
    LoginReceived(Imei),
    Active(Imei),
    /// No more input; acks of frames that commit still go out, then the session ends.
    Draining(CloseReason),
    /// Ends as soon as what is being written is written.
    Closing(CloseReason),
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    records: u32,
    outcome: Option<WriteOutcome>,
    /// Handed out by [`Session::poll_input`], then put back ([`Session::put_back`]): the next
    /// `poll_input` hands it out again with this `seq` (only ever the last entry).
    put_back: bool,
}

/// Counters of one session (the device's live statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub frames: u64,
    pub records_acked: u64,
}

/// One device connection's protocol state. See the module doc.
#[derive(Debug)]
pub struct Session {
    /// Shared by the sessions of a shard (one copy, not 80 bytes per connection).
    cfg: Rc<SessionConfig>,
    state: State,
    started: Instant,
    last_input: Instant,
    /// Frames decoded and not yet acked, in wire order.
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Bytes waiting for [`Session::poll_transmit`]; `frames_queued` acks are in them.
    out: Vec<u8>,
    frames_queued: usize,
    /// A write is under way since this instant; `frames_writing` acks are in it.
    writing_since: Option<Instant>,
    frames_writing: usize,
    /// The command sent and not answered yet (devices answer in order: one at a time).
    command: Option<(i64, Instant)>,
    /// A command whose answer did not come in time, for [`Session::take_command_timeout`].
    command_timed_out: Option<i64>,
    stats: SessionStats,
}

impl Session {
    /// A connection just accepted: it must log in within the login timeout.
    pub fn new(cfg: impl Into<Rc<SessionConfig>>, now: Instant) -> Session {
        Session {
            cfg: cfg.into(),
            state: State::AwaitLogin,
            started: now,
            last_input: now,
            pending: VecDeque::new(),
            next_seq: 0,
            out: Vec::new(),
            frames_queued: 0,
            writing_since: None,
            frames_writing: 0,
            command: None,
            command_timed_out: None,
            stats: SessionStats::default(),
        }
    }

    /// A connection whose login another shard read and checked: the owning shard accepts it
    /// with [`Session::accept_login`].
    pub fn handed_over(cfg: impl Into<Rc<SessionConfig>>, imei: Imei, now: Instant) -> Session {
        let mut s = Session::new(cfg, now);
        s.state = State::LoginReceived(imei);
        s
    }

    /// The logged-in (or logging-in) device.
    pub fn imei(&self) -> Option<Imei> {
        match self.state {
            State::LoginReceived(i) | State::Active(i) => Some(i),
            _ => None,
        }
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// When the connection was accepted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Frames between decode and their ack written.
    pub fn frames_in_flight(&self) -> usize {
        self.pending.len() + self.frames_queued + self.frames_writing
    }

    /// Whether the session wants bytes from the socket now (not while a frame is put back: it
    /// wants that one again first).
    pub fn wants_input(&self) -> bool {
        match self.state {
            State::AwaitLogin => true,
            State::Active(_) => {
                self.frames_in_flight() < self.cfg.max_frames_in_flight && !self.has_put_back()
            }
            _ => false,
        }
    }

    /// `n` bytes were read from the socket.
    pub fn on_bytes_read(&mut self, n: usize, now: Instant) {
        self.stats.bytes_received += n as u64;
        self.last_input = now;
    }

    /// The device closed its side (or the read failed): no more input. What commits is still
    /// acked, as long as the socket takes writes.
    pub fn on_read_end(&mut self, reason: CloseReason) {
        self.drain(reason);
    }

    /// Decodes the next item of `buf` (the bytes read and not yet consumed).
    ///
    /// A frame [put back](Session::put_back) comes first, with its `seq`, even at the in-flight
    /// limit (it is in flight already); once the session is ending, it is gone.
    pub fn poll_input<'a>(&mut self, buf: &'a [u8]) -> Input<'a> {
        let again = self.has_put_back();
        let open = if again {
            matches!(self.state, State::Active(_))
        } else {
            self.wants_input()
        };
        if !open {
            return Input::Paused;
        }
        let decoded = decode_frame(buf, self.cfg.max_frame_len);
        if again {
            return match decoded {
                Ok(Status::Complete((Frame::Avl(avl), used))) => {
                    let p = self
                        .pending
                        .back_mut()
                        .expect("a frame put back is pending");
                    p.put_back = false;
                    Input::Avl {
                        seq: p.seq,
                        avl,
                        used,
                    }
                }
                // A driver bug: it consumed (or changed) the bytes of the frame it put back.
                // Going on would leave the frame pending, unacked, and stall every ack after
                // it: this session ends (nothing unacked is lost: the device resends), not the
                // shard with every other session on it.
                _ => {
                    self.abort(CloseReason::Internal);
                    Input::Paused
                }
            };
        }
        let item = match decoded {
            Ok(Status::Partial(_)) => return Input::NeedBytes,
            Ok(Status::Complete(item)) => item,
            Err(e) => {
                let reason = match (self.state, e) {
                    (State::AwaitLogin, DecodeError::InvalidImei | DecodeError::LoginLength(_)) => {
                        self.out.push(LOGIN_REJECT);
                        CloseReason::BadLogin(e)
                    }
                    _ => CloseReason::BadFrame(e),
                };
                self.drain(reason);
                return Input::Paused;
            }
        };
        match (self.state, item) {
            (_, (Frame::Ping, used)) => Input::Ping { used },
            (State::AwaitLogin, (Frame::Login(imei), used)) => {
                self.state = State::LoginReceived(imei);
                Input::Login { imei, used }
            }
            (State::AwaitLogin, _) => {
                self.close_now(CloseReason::DataBeforeLogin);
                Input::Paused
            }
            (_, (Frame::Login(_), _)) => {
                self.drain(CloseReason::SecondLogin);
                Input::Paused
            }
            (_, (Frame::Avl(avl), used)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.stats.frames += 1;
                self.pending.push_back(Pending {
                    seq,
                    records: avl.count() as u32,
                    outcome: None,
                    put_back: false,
                });
                Input::Avl { seq, avl, used }
            }
            (_, (Frame::Command(frame), used)) => {
                let answers = matches!(frame.kind, TYPE_RESPONSE | TYPE_REFUSED);
                match self.command.take() {
                    Some((id, _)) if answers => Input::CommandAnswer { id, frame, used },
                    pending => {
                        self.command = pending;
                        Input::Command { frame, used }
                    }
                }
            }
        }
    }

    /// Whether a command may be sent now: logged in, not ending, none awaiting its answer.
    pub fn can_send_command(&self) -> bool {
        matches!(self.state, State::Active(_)) && self.command.is_none()
    }

    /// Sends command `id` (its encoded Codec 12/14 frame); its answer comes back as
    /// [`Input::CommandAnswer`], or its id from [`Session::take_command_timeout`]. `false`
    /// when [`Session::can_send_command`] says no.
    pub fn send_command(&mut self, id: i64, frame: &[u8], now: Instant) -> bool {
        if !self.can_send_command() {
            return false;
        }
        self.out.extend_from_slice(frame);
        self.command = Some((id, now + self.cfg.command_timeout));
        true
    }

    /// The command awaiting its answer, if any (when a session ends, it was interrupted).
    pub fn command_in_flight(&self) -> Option<i64> {
        self.command.map(|(id, _)| id)
    }

    /// A command whose answer did not come within the command timeout (reported once).
    pub fn take_command_timeout(&mut self) -> Option<i64> {
        self.command_timed_out.take()
    }

    /// Accepts the login: answers `01`; the device may send records.
    pub fn accept_login(&mut self, now: Instant) {
        if let State::LoginReceived(imei) = self.state {
            self.state = State::Active(imei);
            self.out.push(LOGIN_ACCEPT);
            self.last_input = now;
        }
    }

    /// Refuses the login: answers `00`, then ends.
    pub fn refuse_login(&mut self) {
        if let State::LoginReceived(_) = self.state {
            self.out.push(LOGIN_REJECT);
            self.drain(CloseReason::LoginRefused);
        }
    }

    /// The writer's answer for frame `seq`.
    pub fn on_commit(&mut self, seq: u64, outcome: WriteOutcome) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) {
            p.outcome = Some(outcome);
        }
        // Acks are positional: committed frames at the front are acked; a failed one at the
        // front ends the session (nothing after it may be acked).
        while let Some(front) = self.pending.front() {
            match front.outcome {
                Some(WriteOutcome::Committed) => {
                    let p = self.pending.pop_front().expect("front");
                    self.out.extend_from_slice(&encode_record_ack(p.records));
                    self.stats.records_acked += p.records as u64;
                    self.frames_queued += 1;
                }
                Some(WriteOutcome::Failed) => {
                    self.pending.clear();
                    self.close_now(CloseReason::RecordsRefused);
                    break;
                }
                None => break,
            }
        }
        if self.pending.is_empty() {
            self.pending = VecDeque::new(); // an idle session keeps no capacity
        }
        self.maybe_finish_draining();
    }

    /// Bytes to write now, appended to `buf`; `false` when there is nothing to write or a
    /// write is still under way. Report its end with [`Session::on_write_done`].
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        if self.writing_since.is_some() || self.out.is_empty() {
            return false;
        }
        self.stats.bytes_sent += self.out.len() as u64;
        if buf.is_empty() {
            // Moves the bytes (and their allocation): an idle session keeps no capacity.
            std::mem::swap(buf, &mut self.out);
        } else {
            buf.append(&mut self.out);
        }
        self.frames_writing = std::mem::take(&mut self.frames_queued);
        self.writing_since = Some(now);
        true
    }

    /// The write from [`Session::poll_transmit`] ended.
    pub fn on_write_done(&mut self, ok: bool) {
        self.writing_since = None;
        self.frames_writing = 0;
        if !ok {
            self.close_now(CloseReason::WriteFailed);
        }
        self.maybe_finish_draining();
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let write = self.writing_since.map(|t| t + self.cfg.write_timeout);
        let write = match (write, self.command) {
            (Some(a), Some((_, b))) => Some(a.min(b)),
            (a, c) => a.or(c.map(|(_, b)| b)),
        };
        let own = match self.state {
            State::AwaitLogin => Some(self.started + self.cfg.login_timeout),
            // Idle only while nobody owes anybody: frames waiting for a commit or an ack write
            // are the gateway's delay, not the device's silence.
            State::Active(_) if self.frames_in_flight() == 0 => {
                Some(self.last_input + self.cfg.idle_timeout)
            }
            _ => None,
        };
        match (write, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time has passed: closes the session if a timeout has run out; a command past its
    /// deadline is given up (see [`Session::take_command_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((id, deadline)) = self.command {
            if now >= deadline {
                self.command = None;
                self.command_timed_out = Some(id);
            }
        }
        if self
            .writing_since
            .is_some_and(|t| now >= t + self.cfg.write_timeout)
        {
            // The driver drops the stuck write when it sees the session finished.
            self.abort(CloseReason::WriteTimeout);
            return;
        }
        match self.state {
            State::AwaitLogin if now >= self.started + self.cfg.login_timeout => {
                self.close_now(CloseReason::LoginTimeout)
            }
            State::Active(_)
                if self.frames_in_flight() == 0
                    && now >= self.last_input + self.cfg.idle_timeout =>
            {
                self.close_now(CloseReason::IdleTimeout)
            }
            _ => {}
        }
    }

    /// Frame `seq`, the last one [`Session::poll_input`] handed out, was not taken (the shard
    /// has no room for its rows yet): its bytes stay unconsumed, and the next `poll_input`
    /// decodes them again and hands it out with the same `seq`, counted once. Meanwhile it
    /// stays in flight in its place: frames before it are acked as they commit, nothing after
    /// it is decoded, and the device is not idle. If the session ends first, it is forgotten,
    /// never acked.
    pub fn put_back(&mut self, seq: u64) {
        let last = self.pending.back_mut();
        debug_assert!(
            last.as_ref()
                .is_some_and(|p| p.seq == seq && p.outcome.is_none() && !p.put_back),
            "only the last frame handed out can be put back"
        );
        if let Some(p) = last.filter(|p| p.seq == seq) {
            p.put_back = true;
        }
    }

    /// Whether a frame was put back and not handed out again yet.
    fn has_put_back(&self) -> bool {
        self.pending.back().is_some_and(|p| p.put_back)
    }

    /// Stops reading; frames already submitted are still acked as they commit, then the
    /// session ends (gateway shutdown).
    pub fn close(&mut self, reason: CloseReason) {
        self.drain(reason);
    }

    /// Ends the session at once: no more acks (replaced, disabled, a deadline passed).
    pub fn abort(&mut self, reason: CloseReason) {
        self.pending.clear();
        self.out.clear();
        self.frames_queued = 0;
        self.writing_since = None;
        self.frames_writing = 0;
        self.state = State::Closing(reason);
    }

    /// `Some(reason)` once the session is over and nothing is left to write: the driver closes
    /// the socket.
    pub fn finished(&self) -> Option<CloseReason> {
        match self.state {
            State::Closing(r) if self.out.is_empty() && self.writing_since.is_none() => Some(r),
            _ => None,
        }
    }

    /// Why the session is ending, once it is.
    pub fn closing(&self) -> Option<CloseReason> {
        match self.state {
            State::Draining(r) | State::Closing(r) => Some(r),
            _ => None,
        }
    }

    fn drain(&mut self, reason: CloseReason) {
        match self.state {
            State::Draining(_) | State::Closing(_) => {}
            State::Active(_) => self.state = State::Draining(reason),
            // Nothing can be in flight before the login is accepted.
            _ => self.state = State::Closing(reason),
        }
        // A frame put back was never submitted and is not handed out again: forgotten,
        // unacked (the last entry, so no later frame needs a positional ack after it).
        if self.has_put_back() {
            self.pending.pop_back();
        }
        self.maybe_finish_draining();
    }

    fn close_now(&mut self, reason: CloseReason) {
        if !matches!(self.state, State::Closing(_)) {
            self.state = State::Closing(reason);
        }
        self.pending.clear();
    }

    fn maybe_finish_draining(&mut self) {
        if let State::Draining(r) = self.state {
            if self.pending.is_empty() {
                self.state = State::Closing(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::imei::encode_login;
    use crate::protocol::tcp::encode_avl_frame;
    use crate::protocol::{Codec, OwnedIoValue, Record};

    const IMEI: u64 = 356_307_042_441_013;

    fn cfg() -> SessionConfig {
        SessionConfig {
            max_frame_len: 4096,
            max_frames_in_flight: 3,
            login_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(60),
        }
    }

    fn login() -> Vec<u8> {
        let mut b = Vec::new();
        encode_login(Imei::new(IMEI).unwrap(), &mut b);
        b
    }

    fn avl_frame(records: usize) -> Vec<u8> {
        let recs: Vec<Record> = (0..records)
            .map(|i| Record {
                ts_ms: 1_700_000_000_000 + i as u64,
                priority: 0,
                lon: 0,
                lat: 0,
                alt: 0,
                angle: 0,
                sats: 0,
                speed: 0,
                event_io: 0,
                gen_type: None,
                io: vec![(1, OwnedIoValue::U8(1))],
            })
            .collect();
        let mut out = Vec::new();
        encode_avl_frame(Codec::C8, &recs, &mut out).unwrap();
        out
    }

    /// What the session writes now (and the write finishing at once).
    fn written(s: &mut Session, now: Instant) -> Vec<u8> {
        let mut buf = Vec::new();
        if s.poll_transmit(now, &mut buf) {
            s.on_write_done(true);
        }
        buf
    }

    /// A session logged in as IMEI, its `01` written.
    fn active(t0: Instant) -> Session {
        let mut s = Session::new(cfg(), t0);
        let l = login();
        assert!(matches!(s.poll_input(&l), Input::Login { .. }));
        s.accept_login(t0);
        assert_eq!(written(&mut s, t0), [1]);
        s
    }

    /// Feeds one AVL frame; returns its seq.
    fn feed(s: &mut Session, records: usize) -> u64 {
        feed_frame(s, &avl_frame(records))
    }

    /// Hands `frame` to the session: its seq.
    fn feed_frame(s: &mut Session, frame: &[u8]) -> u64 {
        match s.poll_input(frame) {
            Input::Avl { seq, .. } => seq,
            other => panic!("expected an AVL frame, got {other:?}"),
        }
    }

    #[test]
    fn pings_before_the_login_then_the_login_is_decided_by_the_driver() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_input(&[0xFF]), Input::Ping { used: 1 });
        let l = login();
        assert_eq!(s.poll_input(&l[..5]), Input::NeedBytes);
        assert_eq!(
            s.poll_input(&l),
            Input::Login {
                imei: Imei::new(IMEI).unwrap(),
                used: l.len()
            }
        );
        assert_eq!(s.poll_input(&[]), Input::Paused, "no input until decided");
        s.refuse_login();
        assert_eq!(written(&mut s, t0), [0]);
        assert_eq!(s.finished(), Some(CloseReason::LoginRefused));
    }

    #[test]
    fn a_bad_imei_is_answered_00_and_garbage_or_data_before_login_closes() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_input(b"\x00\x0f12345678901234x"), Input::Paused);
        assert_eq!(written(&mut s, t0), [0]);
        assert!(matches!(s.finished(), Some(CloseReason::BadLogin(_))));

        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_input(b"\x00\x00\x01\x00"), Input::Paused);
        assert_eq!(
            s.finished(),
            Some(CloseReason::BadFrame(DecodeError::BadPreamble))
        );

        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_input(&avl_frame(1)), Input::Paused);
        assert_eq!(s.finished(), Some(CloseReason::DataBeforeLogin));
        assert!(written(&mut s, t0).is_empty());
    }

    #[test]
    fn acks_go_out_in_frame_order_only_after_each_commit() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 2);
        let b = feed(&mut s, 3);
        assert!(written(&mut s, t0).is_empty(), "nothing before a commit");
        s.on_commit(b, WriteOutcome::Committed);
        assert!(written(&mut s, t0).is_empty(), "b waits for a");
        s.on_commit(a, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(s.stats().records_acked, 5);
        assert_eq!(s.finished(), None);
    }

    #[test]
    fn after_a_refused_frame_nothing_more_is_acked_and_the_session_ends() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let b = feed(&mut s, 1);
        let c = feed(&mut s, 1);
        s.on_commit(a, WriteOutcome::Committed);
        s.on_commit(c, WriteOutcome::Committed);
        s.on_commit(b, WriteOutcome::Failed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 1], "only a");
        assert_eq!(s.finished(), Some(CloseReason::RecordsRefused));
    }

    #[test]
    fn input_pauses_at_the_in_flight_limit_until_acks_are_written() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let seqs: Vec<u64> = (0..3).map(|_| feed(&mut s, 1)).collect();
        assert!(!s.wants_input());
        assert_eq!(s.poll_input(&avl_frame(1)), Input::Paused);
        s.on_commit(seqs[0], WriteOutcome::Committed);
        let mut buf = Vec::new();
        assert!(s.poll_transmit(t0, &mut buf));
        assert!(!s.wants_input(), "an ack being written still counts");
        s.on_write_done(true);
        assert!(s.wants_input());

        // Acks queued behind a write in progress count too, until their own write is done.
        let more = feed(&mut s, 1);
        s.on_commit(seqs[1], WriteOutcome::Committed);
        assert!(s.poll_transmit(t0, &mut buf));
        s.on_commit(seqs[2], WriteOutcome::Committed);
        s.on_commit(more, WriteOutcome::Committed);
        assert!(
            !s.wants_input(),
            "one ack being written, two queued behind it"
        );
        s.on_write_done(true);
        assert_eq!(s.frames_in_flight(), 2, "two acks not written yet");
        assert!(s.poll_transmit(t0, &mut buf));
        s.on_write_done(true);
        assert_eq!(s.frames_in_flight(), 0);
    }

    #[test]
    fn one_write_at_a_time_and_a_device_that_does_not_read_times_out() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let b = feed(&mut s, 1);
        s.on_commit(a, WriteOutcome::Committed);
        let mut buf = Vec::new();
        assert!(s.poll_transmit(t0, &mut buf));
        s.on_commit(b, WriteOutcome::Committed);
        assert!(
            !s.poll_transmit(t0, &mut buf),
            "second ack waits for the first write"
        );
        let deadline = s.poll_timeout().unwrap();
        assert_eq!(deadline, t0 + cfg().write_timeout);
        s.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(s.finished(), None);
        s.handle_timeout(deadline);
        assert_eq!(s.finished(), Some(CloseReason::WriteTimeout));
    }

    #[test]
    fn login_and_idle_timeouts() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_timeout(), Some(t0 + cfg().login_timeout));
        s.handle_timeout(t0 + Duration::from_secs(29));
        assert_eq!(s.finished(), None);
        s.handle_timeout(t0 + cfg().login_timeout);
        assert_eq!(s.finished(), Some(CloseReason::LoginTimeout));

        let mut s = active(t0);
        let t1 = t0 + Duration::from_secs(100);
        s.on_bytes_read(10, t1);
        assert_eq!(s.poll_timeout(), Some(t1 + cfg().idle_timeout));
        // While a frame waits for its commit the device is not idle, however long it takes.
        let a = feed(&mut s, 1);
        assert_eq!(s.poll_timeout(), None);
        s.handle_timeout(t1 + Duration::from_secs(10_000));
        assert_eq!(s.finished(), None);
        s.on_commit(a, WriteOutcome::Committed);
        written(&mut s, t1);
        s.handle_timeout(t1 + cfg().idle_timeout);
        assert_eq!(s.finished(), Some(CloseReason::IdleTimeout));
    }

    #[test]
    fn graceful_close_acks_what_commits_then_ends_and_abort_ends_at_once() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 4);
        s.close(CloseReason::Shutdown);
        assert!(!s.wants_input());
        assert_eq!(s.finished(), None, "a frame is still in flight");
        s.on_commit(a, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 4]);
        assert_eq!(s.finished(), Some(CloseReason::Shutdown));

        let mut s = active(t0);
        let a = feed(&mut s, 4);
        s.abort(CloseReason::Replaced);
        assert_eq!(s.finished(), Some(CloseReason::Replaced));
        s.on_commit(a, WriteOutcome::Committed);
        assert!(written(&mut s, t0).is_empty(), "no ack after an abort");
    }

    #[test]
    fn a_frame_put_back_is_handed_out_again_with_its_seq_counted_once() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let fb = avl_frame(2);
        let b = feed_frame(&mut s, &fb);
        s.put_back(b);
        assert_eq!(s.stats().frames, 2);
        assert_eq!(s.frames_in_flight(), 2, "still in flight, in its place");
        assert!(!s.wants_input(), "no new bytes before the frame put back");
        // Frames before it are acked as they commit.
        s.on_commit(a, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 1]);
        // Taken again: the same seq, the same frame, not counted again.
        match s.poll_input(&fb) {
            Input::Avl { seq, avl, used } => {
                assert_eq!((seq, avl.count(), used), (b, 2, fb.len()));
            }
            other => panic!("expected the frame put back, got {other:?}"),
        }
        assert_eq!(s.stats().frames, 2);
        assert_eq!(s.frames_in_flight(), 1);
        assert!(s.wants_input());
        // Positional acks after it: c commits first and still waits for b.
        let c = feed(&mut s, 3);
        assert_eq!(c, b + 1, "the next frame gets the next seq");
        s.on_commit(c, WriteOutcome::Committed);
        assert!(written(&mut s, t0).is_empty(), "c waits for b");
        s.on_commit(b, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(s.stats().records_acked, 6);
        assert_eq!(s.stats().frames, 3);
    }

    #[test]
    fn a_frame_put_back_at_the_in_flight_limit_is_still_handed_out() {
        let t0 = Instant::now();
        let mut s = active(t0);
        feed(&mut s, 1);
        feed(&mut s, 1);
        let f = avl_frame(1);
        let seq = feed_frame(&mut s, &f);
        s.put_back(seq);
        assert!(!s.wants_input());
        assert!(matches!(s.poll_input(&f), Input::Avl { seq: again, .. } if again == seq));
        assert_eq!(s.poll_input(&f), Input::Paused, "at the limit: nothing new");
    }

    #[test]
    fn a_frame_put_back_keeps_the_device_from_being_idle() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let f = avl_frame(1);
        let seq = feed_frame(&mut s, &f);
        s.put_back(seq);
        assert_eq!(s.poll_timeout(), None);
        s.handle_timeout(t0 + cfg().idle_timeout * 10);
        assert_eq!(s.finished(), None);
        assert!(matches!(s.poll_input(&f), Input::Avl { .. }));
    }

    #[test]
    fn a_frame_put_back_when_the_session_ends_is_forgotten_and_never_acked() {
        let t0 = Instant::now();
        // Graceful close while it waits: what was submitted before it is acked, it is not.
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let f = avl_frame(2);
        let b = feed_frame(&mut s, &f);
        s.put_back(b);
        s.close(CloseReason::Shutdown);
        assert_eq!(
            s.poll_input(&f),
            Input::Paused,
            "not handed out once ending"
        );
        assert_eq!(s.frames_in_flight(), 1, "b forgotten");
        assert_eq!(s.finished(), None, "a is still in flight");
        s.on_commit(a, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 1]);
        assert_eq!(s.finished(), Some(CloseReason::Shutdown));

        // The only frame in flight: the session ends at once.
        let mut s = active(t0);
        let seq = feed_frame(&mut s, &f);
        s.put_back(seq);
        s.close(CloseReason::Shutdown);
        assert_eq!(s.finished(), Some(CloseReason::Shutdown));
        assert!(written(&mut s, t0).is_empty());

        // Aborted (replaced) while it waits: nothing is acked.
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let b = feed_frame(&mut s, &f);
        s.put_back(b);
        s.abort(CloseReason::Replaced);
        assert_eq!(s.poll_input(&f), Input::Paused);
        s.on_commit(a, WriteOutcome::Committed);
        assert!(written(&mut s, t0).is_empty());
        assert_eq!(s.finished(), Some(CloseReason::Replaced));

        // A frame before it refused while it waits: positional acks end the session.
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        let b = feed_frame(&mut s, &f);
        s.put_back(b);
        s.on_commit(a, WriteOutcome::Failed);
        assert_eq!(s.closing(), Some(CloseReason::RecordsRefused));
        assert_eq!(s.poll_input(&f), Input::Paused);
        assert!(written(&mut s, t0).is_empty());
        assert_eq!(s.finished(), Some(CloseReason::RecordsRefused));
    }

    #[test]
    fn a_frame_put_back_but_not_given_again_ends_the_session_unacked() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let seq = feed(&mut s, 1);
        s.put_back(seq);
        assert!(matches!(s.poll_input(&[]), Input::Paused));
        assert_eq!(s.closing(), Some(CloseReason::Internal));
        assert_eq!(s.finished(), Some(CloseReason::Internal));
        let mut out = Vec::new();
        s.poll_transmit(t0, &mut out);
        assert!(out.is_empty(), "nothing acked");
    }

    #[test]
    fn the_peer_closing_still_gets_its_committed_acks() {
        let t0 = Instant::now();
        let mut s = active(t0);
        let a = feed(&mut s, 1);
        s.on_read_end(CloseReason::ClosedByPeer);
        s.on_commit(a, WriteOutcome::Committed);
        assert_eq!(written(&mut s, t0), [0, 0, 0, 1]);
        assert_eq!(s.finished(), Some(CloseReason::ClosedByPeer));
    }

    #[test]
    fn a_second_login_or_a_bad_frame_ends_the_session() {
        let t0 = Instant::now();
        let mut s = active(t0);
        assert_eq!(s.poll_input(&login()), Input::Paused);
        assert_eq!(s.finished(), Some(CloseReason::SecondLogin));

        let mut s = active(t0);
        let mut f = avl_frame(1);
        let n = f.len();
        f[n - 1] ^= 1;
        assert_eq!(s.poll_input(&f), Input::Paused);
        assert!(matches!(
            s.finished(),
            Some(CloseReason::BadFrame(DecodeError::Crc { .. }))
        ));
    }

    fn response(kind: u8, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::protocol::tcp::encode_command_frame(Codec::C12, kind, None, text, &mut out);
        out
    }

    #[test]
    fn one_command_at_a_time_answered_by_the_next_response() {
        let t0 = Instant::now();
        let mut s = active(t0);
        assert!(s.send_command(7, b"cmd-frame", t0));
        assert!(!s.can_send_command(), "one in flight");
        assert!(!s.send_command(8, b"x", t0));
        assert_eq!(written(&mut s, t0), b"cmd-frame");
        // A one-way message does not answer it.
        let msg = response(crate::protocol::command::TYPE_MESSAGE, b"hello");
        assert!(matches!(s.poll_input(&msg), Input::Command { .. }));
        assert_eq!(s.command_in_flight(), Some(7));
        let r = response(TYPE_RESPONSE, b"DOUT1:1");
        match s.poll_input(&r) {
            Input::CommandAnswer { id, frame, .. } => {
                assert_eq!(id, 7);
                assert_eq!(frame.text(), Some("DOUT1:1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(s.can_send_command());
        // A response with nothing in flight answers nothing.
        assert!(matches!(s.poll_input(&r), Input::Command { .. }));
    }

    #[test]
    fn an_unanswered_command_times_out_without_ending_the_session() {
        let t0 = Instant::now();
        let mut s = active(t0);
        s.send_command(9, b"c", t0);
        written(&mut s, t0);
        let at = s.poll_timeout().unwrap();
        assert_eq!(at, t0 + cfg().command_timeout);
        s.handle_timeout(at);
        assert_eq!(s.take_command_timeout(), Some(9));
        assert_eq!(s.take_command_timeout(), None);
        assert!(s.can_send_command());
        assert_eq!(s.finished(), None);
    }

    #[test]
    fn a_handed_over_session_is_accepted_by_its_owner() {
        let t0 = Instant::now();
        let imei = Imei::new(IMEI).unwrap();
        let mut s = Session::handed_over(cfg(), imei, t0);
        assert_eq!(s.imei(), Some(imei));
        s.accept_login(t0);
        assert_eq!(written(&mut s, t0), [1]);
        assert!(matches!(s.poll_input(&avl_frame(1)), Input::Avl { .. }));
    }
}
