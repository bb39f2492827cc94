//! A device's TCP connection: the thin glommio driver around [`Session`]. Runs on a shard.
//!
//! One task per connection waits, in one poll, for everything that can happen to it: bytes
//! to read (only while the session wants input), commit answers from the writer, the end of
//! a write, the session's next deadline, and a cancellation from the shard
//! ([`ConnCtl::cancel`]: replacement, a disabled device, shutdown). So a session is
//! cancellable whatever it awaits, and ending it drops its buffer, descriptor and connection
//! slot at once. The one other wait is for the shard's byte budget before a frame's rows are
//! encoded, and it is cancellable too.
//!
//! Two phases. On the accepting shard the session reads the login; the driver checks the
//! device policy and either refuses it, serves it here, or hands the socket (a duplicate
//! descriptor, plus any bytes read after the login) to the owning shard. On the owning shard
//! the session runs until it ends, and its end is recorded with its [`CloseReason`].
//!
//! Logging: nothing above debug per frame or per session. A session's start and end, with
//! its peer and typed reason (including a replacement, a refused login, bad input), are rows
//! of `device_sessions` and events of the outbox (`devices/{imei}/connected`,
//! `…/disconnected`, `…/login_refused`), and every kind is counted in the metrics
//! (`fleetgate_logins_total`, `fleetgate_bad_frames_total`, `fleetgate_sessions_ended_total`,
//! `fleetgate_connection_timeouts_total`, …). At info they would also be one log line per
//! session, or per connection of anyone sending garbage to the port.

use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::channel::oneshot;
use futures::io::AsyncWrite;
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::control::ControlMsg;
use crate::protocol::Imei;
use crate::session::{CloseReason, Input, Session};
use crate::shard::budget::Permit;
use crate::shard::copy::{encode_rows, rows_len};
use crate::shard::pool::ReadBuf;
use crate::shard::{shard_for, Cancel, ConnGuard, Fix, Shard, ShardMsg, ShardStats, Signal};
use crate::sink::{TelemetryEvent, WriteOutcome, WriterBatch};

/// A connection just accepted on this shard.
pub async fn accepted(shard: Rc<Shard>, stream: TcpStream, conn: ConnGuard) {
    let peer = stream.peer_addr().ok();
    let session = Session::new(shard.session_config.clone(), Instant::now());
    let mut d = Driver::new(shard.clone(), conn, stream, session);
    let mut rb = ReadBuf::new(shard.pool.clone());
    let imei = match d.run(&mut rb).await {
        Ended::Login(imei) => imei,
        Ended::Finished(reason) => {
            count_close(&shard, reason);
            tracing::debug!(shard = shard.id, peer = ?peer, %reason, "Connection closed before login.");
            return;
        }
    };
    if !shard.policy.admits(imei) {
        ShardStats::inc(&shard.stats.logins_rejected);
        tracing::debug!(shard = shard.id, %imei, "Login refused by the device policy.");
        shard.session_event(
            imei,
            "login_refused",
            peer,
            Some(CloseReason::LoginRefused.to_string()),
        );
        d.session.refuse_login();
        d.run(&mut rb).await;
        return;
    }
    let owner = shard_for(imei, shard.nr_shards);
    if owner == shard.id {
        // A task of its own: this one's state (sized for the login phase) is freed now.
        crate::shard::spawn_detached(&shard.gate, logged_in(d, rb, imei, peer));
        return;
    }
    hand_over(&shard, &d.stream, imei, peer, rb.data(), owner);
}

/// Sends a logged-in socket to its owning shard: a duplicate descriptor travels, this one
/// closes when the caller drops its stream. A failure is counted and logged; the device
/// reconnects.
fn hand_over(
    shard: &Shard,
    stream: &TcpStream,
    imei: Imei,
    peer: Option<SocketAddr>,
    pending: &[u8],
    owner: usize,
) {
    let failed = |why: String| {
        ShardStats::inc(&shard.stats.handoffs_failed);
        tracing::warn!(shard = shard.id, owner, %imei, why, "Hand-over failed; closing the connection.");
    };
    // SAFETY: dup(2) of a descriptor we own; the result is checked before it is owned.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        return failed(format!("dup: {}", io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let msg = ShardMsg::Adopt {
        fd,
        imei,
        peer: peer.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
        pending: pending.to_vec(),
    };
    match shard.inboxes[owner].unbounded_send(msg) {
        Ok(()) => ShardStats::inc(&shard.stats.handoffs),
        Err(_) => failed("the owning shard's inbox is closed".into()),
    }
}

/// A logged-in connection handed over by the shard that accepted it. Refused (and counted)
/// when this shard is at its connection cap or stopping: the device reconnects.
pub fn adopt(shard: &Rc<Shard>, fd: OwnedFd, imei: Imei, peer: SocketAddr, pending: Vec<u8>) {
    if shard.is_stopping() {
        return;
    }
    let Some(conn) = ConnGuard::register(shard) else {
        return; // counted and logged by `register`; `fd` closes here
    };
    // SAFETY: `fd` is an owned, open TCP socket descriptor.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let rb = ReadBuf::with_bytes(shard.pool.clone(), &pending);
    let session = Session::handed_over(shard.session_config.clone(), imei, Instant::now());
    let d = Driver::new(shard.clone(), conn, stream, session);
    crate::shard::spawn_detached(&shard.gate, logged_in(d, rb, imei, Some(peer)));
}

/// The session of a logged-in device on its owning shard, from its `01` to its end.
///
/// A plain `fn` returning an `async move` block, not an `async fn`: an `async fn` moves its
/// arguments from the future's argument slots into locals, and both stay in the state, so
/// the idle connection's task held the `Driver` twice (1,424 bytes instead of 800; see
/// tuning/idle-memory.md). The block uses its captures in place.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn logged_in(
    mut d: Driver,
    mut rb: ReadBuf,
    imei: Imei,
    peer: Option<SocketAddr>,
) -> impl Future<Output = ()> {
    // Only `d`, `rb` and `imei` are held while the session runs: the shard, the peer (kept in
    // `live.peer` here, before the task exists) and the connection id are taken from `d`
    // before and after.
    d.conn.ctl.live.peer.set(peer);
    async move {
        {
            let shard = d.shard.clone();
            let peer = d.conn.ctl.live.peer.get();
            if let Some(old) = shard.devices.borrow_mut().attach(imei, d.conn.ctl.clone()) {
                ShardStats::inc(&shard.stats.replaced);
                tracing::debug!(shard = shard.id, %imei, "New connection replaces the previous one.");
                old.cancel(Cancel::Abort(CloseReason::Replaced));
            }
            d.session.accept_login(Instant::now());
            d.conn
                .ctl
                .live
                .connected_at_ms
                .set(crate::time::unix_now_ms());
            ShardStats::inc(&shard.stats.logins_accepted);
            let _ = shard.control.send(ControlMsg::DeviceOnline {
                imei,
                shard: shard.id,
            });
            tracing::debug!(shard = shard.id, %imei, peer = ?peer, "Device logged in.");
            shard.session_event(imei, "connect", peer, None);
        }
        let reason = match d.run(&mut rb).await {
            Ended::Finished(r) => r,
            Ended::Login(_) => unreachable!("a session logs in once"),
        };
        let shard = d.shard.clone();
        let peer = d.conn.ctl.live.peer.get();
        count_close(&shard, reason);
        if let Some(id) = d.session.command_in_flight() {
            let _ = shard
                .control
                .send(ControlMsg::CommandUndelivered { id, imei });
        }
        // A replaced session leaves the device online on its successor.
        if shard.devices.borrow_mut().detach(imei, d.conn.ctl.id) {
            let _ = shard.control.send(ControlMsg::DeviceOffline { imei });
        }
        tracing::debug!(shard = shard.id, %imei, %reason, "Device disconnected.");
        shard.session_event(imei, "disconnect", peer, Some(reason.to_string()));
    }
}

fn count_close(shard: &Shard, reason: CloseReason) {
    let s = &shard.stats;
    match reason {
        CloseReason::LoginTimeout => ShardStats::inc(&s.login_timeouts),
        CloseReason::IdleTimeout => ShardStats::inc(&s.idle_timeouts),
        CloseReason::WriteTimeout => ShardStats::inc(&s.write_timeouts),
        CloseReason::BadLogin(_) => ShardStats::inc(&s.logins_rejected),
        CloseReason::BadFrame(_) | CloseReason::DataBeforeLogin | CloseReason::SecondLogin => {
            ShardStats::inc(&s.decode_errors)
        }
        CloseReason::RecordsRefused => ShardStats::inc(&s.frames_failed),
        CloseReason::Internal => tracing::error!(
            shard = shard.id,
            "A session broke its driver's contract (a bug); that connection was closed."
        ),
        _ => {}
    }
    if let CloseReason::BadFrame(e) | CloseReason::BadLogin(e) = reason {
        tracing::debug!(shard = shard.id, error = %e, "Bad input; closing the connection.");
    }
}

/// Why [`Driver::run`] returned.
enum Ended {
    /// The session decoded a login: the caller decides.
    Login(Imei),
    Finished(CloseReason),
}

/// What [`Driver::take_input`] left off at.
enum Taken {
    /// Nothing more to take now (more bytes needed, input paused, or the session ended).
    Nothing,
    /// The session decoded a login: the caller decides.
    Login(Imei),
    /// An AVL frame needs `need` bytes of the shard's budget, which has no room now: it was
    /// put back in the session, neither consumed nor submitted.
    NoRoom { need: usize },
}

/// One thing that happened to a connection.
enum Event {
    Signal(Signal),
    Commit(u64, WriteOutcome),
    Written(io::Result<()>),
    Read(io::Result<usize>),
    Timer,
}

/// A frame's commit answer, tagged with the frame's sequence number.
struct Commit {
    seq: u64,
    rx: oneshot::Receiver<WriteOutcome>,
}

impl Future for Commit {
    type Output = (u64, WriteOutcome);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(u64, WriteOutcome)> {
        let seq = self.seq;
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| (seq, r.unwrap_or(WriteOutcome::Failed)))
    }
}

/// The IO around one [`Session`].
struct Driver {
    shard: Rc<Shard>,
    conn: ConnGuard,
    stream: TcpStream,
    session: Session,
    /// Commit answers awaited, at most the session's in-flight window: polled in place (no
    /// allocation per frame, none at all for an idle connection).
    commits: Vec<Commit>,
    /// What is being written, and how much of it is out.
    out: Vec<u8>,
    out_pos: usize,
    /// The armed timer and the instant it fires (re-armed when the session wants earlier).
    timer: Option<(Instant, Timer)>,
}

impl Driver {
    fn new(shard: Rc<Shard>, conn: ConnGuard, stream: TcpStream, session: Session) -> Driver {
        Driver {
            shard,
            conn,
            stream,
            session,
            commits: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            timer: None,
        }
    }

    /// Drives the session until it decodes a login or ends.
    ///
    /// A plain `fn` returning an `async move` block, as [`logged_in`]: an `async fn` keeps its
    /// arguments (`self`, `rb`) twice in its state, 16 bytes of every connection's task.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn run<'a>(&'a mut self, rb: &'a mut ReadBuf) -> impl Future<Output = Ended> + 'a {
        async move {
            loop {
                let mut taken = self.take_input(rb, None);
                while let Taken::NoRoom { need } = taken {
                    // Boxed: rare, and inline it would size every connection's task. Then the
                    // frame put back in the session is taken again, with the room waited for.
                    taken = match Box::pin(self.wait_for_budget(need)).await {
                        Some(permit) => self.take_input(rb, Some(permit)),
                        None => Taken::Nothing,
                    };
                }
                if let Taken::Login(imei) = taken {
                    return Ended::Login(imei);
                }
                if self.out_pos == self.out.len() {
                    self.out = Vec::new(); // written: an idle connection keeps no capacity
                    self.out_pos = 0;
                    self.session.poll_transmit(Instant::now(), &mut self.out);
                }
                if let Some(reason) = self.session.finished() {
                    return Ended::Finished(reason);
                }
                self.arm_timer();
                let ev = poll_fn(|cx| self.poll_event(cx, Some(&mut *rb))).await;
                self.apply(ev);
            }
        }
    }

    /// Handles every complete item in the buffer the session will take now. Synchronous: an
    /// `await` here would keep this function's state (the decoded item) in every connection's
    /// task. An AVL frame the shard's budget has no room for is put back in the session,
    /// unconsumed and unsubmitted, and returned as [`Taken::NoRoom`]: [`Driver::run`] waits for
    /// the room and calls this again with it (`room`), and the session hands the same frame out
    /// first.
    fn take_input(&mut self, rb: &mut ReadBuf, mut room: Option<Permit>) -> Taken {
        loop {
            match self.session.poll_input(rb.data()) {
                Input::NeedBytes | Input::Paused => return Taken::Nothing,
                Input::Ping { used } => rb.consume(used),
                Input::Login { imei, used } => {
                    rb.consume(used);
                    return Taken::Login(imei);
                }
                Input::CommandAnswer { id, frame, used } => {
                    let imei = self
                        .session
                        .imei()
                        .expect("commands go to logged-in devices");
                    let refused = frame.kind == crate::protocol::command::TYPE_REFUSED;
                    // The device's answer as text; binary answers as hex.
                    let text = match frame.text() {
                        Some(t) => t.to_string(),
                        None => hex::encode(frame.payload),
                    };
                    tracing::debug!(shard = self.shard.id, %imei, command = id, refused, %text, "Command answered.");
                    let _ = self.shard.control.send(ControlMsg::CommandAnswered {
                        id,
                        imei,
                        refused,
                        text,
                    });
                    rb.consume(used);
                }
                Input::Command { frame, used } => {
                    ShardStats::inc(&self.shard.stats.commands_received);
                    tracing::debug!(shard = self.shard.id, imei = ?self.session.imei(), codec = ?frame.codec, kind = frame.kind, text = frame.text().unwrap_or(""), "Command frame from device.");
                    rb.consume(used);
                }
                Input::Avl { seq, avl, used } => {
                    let need = rows_len(&avl);
                    let permit = match room.take() {
                        // The frame put back, handed out again: counted when first decoded.
                        Some(p) => p,
                        None => {
                            ShardStats::inc(&self.shard.stats.frames_received);
                            self.note_frame(&avl);
                            match self.shard.budget.try_acquire(need) {
                                Some(p) => p,
                                None => {
                                    self.session.put_back(seq);
                                    return Taken::NoRoom { need };
                                }
                            }
                        }
                    };
                    let imei = self.session.imei().expect("AVL only after login");
                    let mut rows = Vec::with_capacity(need);
                    encode_rows(imei, &avl, crate::time::unix_now_us(), &mut rows);
                    let (done, rx) = oneshot::channel();
                    let batch = WriterBatch {
                        rows: rows.into(),
                        records: avl.count() as u32,
                        done,
                        permit,
                        telemetry: self
                            .shard
                            .telemetry
                            .wants_telemetry(imei)
                            .then(|| Box::new(TelemetryEvent::from_avl(imei, &avl))),
                    };
                    rb.consume(used);
                    if self.shard.writer.send_rows(batch).is_err() {
                        tracing::error!(shard = self.shard.id, %imei, "Writer gone; records not accepted.");
                        self.session.abort(CloseReason::WriterGone);
                        return Taken::Nothing;
                    }
                    self.commits.push(Commit { seq, rx });
                }
            }
        }
    }

    /// The frame's arrival and its last position, for the API.
    fn note_frame(&self, avl: &crate::protocol::AvlData<'_>) {
        let live = &self.conn.ctl.live;
        live.last_frame_ms.set(crate::time::unix_now_ms());
        if let Some(r) = avl.records().last() {
            live.last_fix.set(Some(Fix {
                ts_ms: r.ts_ms(),
                lat: r.lat(),
                lon: r.lon(),
                alt: r.alt(),
                angle: r.angle(),
                sats: r.sats(),
                speed: r.speed(),
            }));
        }
    }

    /// Waits for `need` bytes of the shard's budget for the frame put back in the session,
    /// while still answering commits, finishing writes and obeying cancellation. `None` when
    /// the session ended meanwhile (the session forgets the frame, never submitted, never
    /// acked).
    async fn wait_for_budget(&mut self, need: usize) -> Option<Permit> {
        let mut acquire = self.shard.budget.acquire(need);
        loop {
            let got = poll_fn(|cx| {
                if let Poll::Ready(p) = Pin::new(&mut acquire).poll(cx) {
                    return Poll::Ready(Ok(p));
                }
                self.poll_event(cx, None).map(Err)
            })
            .await;
            match got {
                Ok(p) => return Some(p),
                Err(ev) => self.apply(ev),
            }
            if self.session.closing().is_some() {
                return None;
            }
        }
    }

    /// The next event; reads only when given the read buffer and the session wants input.
    fn poll_event(&mut self, cx: &mut Context<'_>, rb: Option<&mut ReadBuf>) -> Poll<Event> {
        if let Poll::Ready(s) = self.conn.ctl.poll_signal(cx) {
            return Poll::Ready(Event::Signal(s));
        }
        for i in 0..self.commits.len() {
            if let Poll::Ready((seq, o)) = Pin::new(&mut self.commits[i]).poll(cx) {
                self.commits.swap_remove(i);
                if self.commits.is_empty() {
                    self.commits = Vec::new(); // an idle connection keeps no capacity
                }
                return Poll::Ready(Event::Commit(seq, o));
            }
        }
        while self.out_pos < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Event::Written(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    self.out_pos += n;
                    if self.out_pos == self.out.len() {
                        return Poll::Ready(Event::Written(Ok(())));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Written(Err(e))),
                Poll::Pending => break,
            }
        }
        if let Some(rb) = rb {
            if self.session.wants_input() {
                if let Poll::Ready(r) = rb.poll_fill(cx, &mut self.stream) {
                    return Poll::Ready(Event::Read(r));
                }
            }
        }
        if let Some((_, t)) = self.timer.as_mut() {
            if Pin::new(t).poll(cx).is_ready() {
                self.timer = None;
                return Poll::Ready(Event::Timer);
            }
        }
        Poll::Pending
    }

    fn apply(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Signal(Signal::Cancel(Cancel::Graceful(r))) => self.session.close(r),
            Event::Signal(Signal::Cancel(Cancel::Abort(r))) => self.session.abort(r),
            Event::Signal(Signal::Command { id, frame }) => {
                let imei = self
                    .session
                    .imei()
                    .expect("commands go to logged-in devices");
                let msg = if self.session.send_command(id, &frame, now) {
                    let live = &self.conn.ctl.live;
                    live.commands_sent.set(live.commands_sent.get() + 1);
                    ControlMsg::CommandSent { id, imei }
                } else {
                    ControlMsg::CommandUndelivered { id, imei }
                };
                let _ = self.shard.control.send(msg);
            }
            Event::Commit(seq, o) => {
                let before = self.session.stats().records_acked;
                self.session.on_commit(seq, o);
                let acked = self.session.stats().records_acked - before;
                if acked > 0 {
                    self.shard
                        .stats
                        .records_acked
                        .fetch_add(acked, Ordering::Relaxed);
                    if let Some(imei) = self.session.imei() {
                        self.shard
                            .stored(imei, acked as u32, crate::time::unix_now_ms());
                    }
                }
            }
            Event::Written(r) => self.session.on_write_done(r.is_ok()),
            Event::Read(Ok(0)) => self.session.on_read_end(CloseReason::ClosedByPeer),
            Event::Read(Ok(n)) => self.session.on_bytes_read(n, now),
            Event::Read(Err(_)) => self.session.on_read_end(CloseReason::ReadError),
            Event::Timer => {
                self.session.handle_timeout(now);
                if let Some(id) = self.session.take_command_timeout() {
                    let imei = self
                        .session
                        .imei()
                        .expect("commands go to logged-in devices");
                    let _ = self
                        .shard
                        .control
                        .send(ControlMsg::CommandTimedOut { id, imei });
                }
            }
        }
        self.show_live();
    }

    /// Copies the session's counters where the shard (and so the API) sees them.
    fn show_live(&self) {
        let (live, st) = (&self.conn.ctl.live, self.session.stats());
        if st.bytes_sent > live.bytes_sent.get() {
            live.last_sent_ms.set(crate::time::unix_now_ms());
        }
        live.bytes_received.set(st.bytes_received);
        live.bytes_sent.set(st.bytes_sent);
        live.frames.set(st.frames);
        live.records.set(st.records_acked);
    }

    /// Keeps a timer armed no later than the session's next deadline. A deadline that moved
    /// later (the idle timer after a read) keeps the earlier timer: when it fires, the session
    /// finds nothing expired and the timer is armed again.
    fn arm_timer(&mut self) {
        let Some(at) = self.session.poll_timeout() else {
            return;
        };
        if self.timer.as_ref().is_some_and(|(t, _)| *t <= at) {
            return;
        }
        let now = Instant::now();
        self.timer = Some((at, Timer::new(at.saturating_duration_since(now))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// The size of what `f` returns, without calling it.
    fn returned2<F: FnOnce(A, B) -> R, A, B, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// The size of `spawn_detached`'s future (`shard::gated`) around what `f` returns.
    fn gated_around<F: Future<Output = ()>>(
        _: &impl FnOnce(Driver, ReadBuf, Imei, Option<SocketAddr>) -> F,
    ) -> usize {
        returned2(&crate::shard::gated::<F>)
    }

    /// What glommio 0.9 allocates for a task besides its future (`task/raw.rs`, `Header` then
    /// the schedule closure, then the future): the header (an `Arc`, state and counts, the
    /// awaiter `Option<Waker>`, the vtable: 40 bytes) and the closure (a `Weak`, 8).
    const GLOMMIO_TASK_OVERHEAD: usize = 48;

    /// An idle device's connection task is this future (in the gate's pass, `shard::gated`)
    /// plus glommio's task header: kept within 640 bytes, mimalloc's 640-byte size class. It
    /// was 1,424 bytes (the `async fn` holding its `Driver` twice, the session config copied
    /// per connection, the peer, shard and id kept across the session), then 680 with
    /// `take_input`'s future (112 bytes, for its rare budget wait) in `Driver::run`'s state;
    /// see tuning/idle-memory.md.
    #[test]
    fn an_idle_connection_task_fits_the_640_byte_class() {
        let fut = returned(&logged_in);
        let task = GLOMMIO_TASK_OVERHEAD + gated_around(&logged_in);
        let driver = std::mem::size_of::<Driver>();
        let session = std::mem::size_of::<Session>();
        eprintln!("logged-in future {fut} bytes, task {task}, Driver {driver}, Session {session}");
        assert!(task <= 640, "the logged-in connection task is {task} bytes");
        assert!(driver <= 480, "Driver is {driver} bytes");
    }
}
