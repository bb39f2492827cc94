//! A device's TCP connection. Runs on a shard.
//!
//! Two phases. On the accepting shard: read the login (under the login timeout), check the
//! IMEI and the device policy, and hand the socket to the owning shard if that is another one.
//! On the owning shard: the session. Its reader decodes frames in place, encodes their rows for
//! the writer and queues one pending ack per frame; its acker answers each frame, in order,
//! once the writer says the rows are committed. The queue between them is bounded, so a slow
//! database stops the reader, and with it the device.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;

use crate::protocol::imei::{LOGIN_ACCEPT, LOGIN_REJECT};
use crate::protocol::{decode_frame, encode_record_ack, DecodeError, Frame, Imei, Status};
use crate::shard::pool::ReadBuf;
use crate::shard::{
    shard_for, shut_read, with_timeout, Shard, ShardMsg, ShardStats, SubmitError, Submitted,
};
use crate::sink::{SessionEvent, WriteOutcome};

/// How long one reply write may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keeps a connection in its shard's table (and its count) while it lives. Registered by the
/// accept loop itself, so the connection cap holds even when many arrive at once.
pub struct ConnGuard {
    shard: Rc<Shard>,
    id: u64,
    fd: RawFd,
}

impl ConnGuard {
    pub fn register(shard: &Rc<Shard>, fd: RawFd) -> ConnGuard {
        let id = shard.next_conn_id();
        shard.conns.borrow_mut().insert(id, fd);
        shard.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            shard: shard.clone(),
            id,
            fd,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shard.conns.borrow_mut().remove(&self.id);
        self.shard
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection just accepted on this shard.
pub async fn accepted(shard: Rc<Shard>, mut stream: TcpStream, conn: ConnGuard) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut rb = ReadBuf::new(shard.pool.clone());
    let imei = match read_login(&shard, &mut stream, &mut rb).await {
        Ok(imei) => imei,
        Err(reason) => {
            tracing::info!(shard = shard.id, peer = ?peer, reason, "Connection closed before login.");
            return;
        }
    };
    if !shard.policy.admits(imei) {
        ShardStats::inc(&shard.stats.logins_rejected);
        tracing::info!(shard = shard.id, %imei, "Login refused by the device policy.");
        let _ = stream.write_all(&[LOGIN_REJECT]).await;
        return;
    }
    let owner = shard_for(imei, shard.nr_shards);
    if owner == shard.id {
        return session(shard, stream, conn, imei, peer, rb).await;
    }
    // Hand the socket over: a duplicate descriptor travels, this one closes with `stream`.
    // SAFETY: dup(2) of a descriptor we own; the result is checked before it is owned.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        tracing::warn!(shard = shard.id, %imei, "Hand-over failed: dup: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let msg = ShardMsg::Adopt {
        fd,
        imei,
        peer: peer.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
        pending: rb.data().to_vec(),
    };
    if shard.inboxes[owner].unbounded_send(msg).is_ok() {
        ShardStats::inc(&shard.stats.handoffs);
    }
    drop(conn);
}

/// A logged-in connection handed over by the shard that accepted it.
pub async fn adopt(shard: Rc<Shard>, fd: OwnedFd, imei: Imei, peer: SocketAddr, pending: Vec<u8>) {
    // SAFETY: `fd` is an owned, open TCP socket descriptor.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let conn = ConnGuard::register(&shard, stream.as_raw_fd());
    let rb = ReadBuf::with_bytes(shard.pool.clone(), &pending);
    if shard.is_stopping() {
        return; // the device reconnects to the next gateway
    }
    session(shard, stream, conn, imei, Some(peer), rb).await;
}

/// Reads up to the login. Pings before it are skipped; a bad IMEI is answered `00`.
async fn read_login(
    shard: &Shard,
    stream: &mut TcpStream,
    rb: &mut ReadBuf,
) -> Result<Imei, &'static str> {
    let deadline = Instant::now() + shard.config.login_timeout();
    loop {
        match decode_frame(rb.data(), shard.config.max_frame_len) {
            Ok(Status::Complete((Frame::Ping, used))) => rb.consume(used),
            Ok(Status::Complete((Frame::Login(imei), used))) => {
                rb.consume(used);
                return Ok(imei);
            }
            Ok(Status::Complete(_)) => {
                ShardStats::inc(&shard.stats.decode_errors);
                return Err("data before login");
            }
            Ok(Status::Partial(_)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match with_timeout(left, rb.fill(stream)).await {
                    None => {
                        ShardStats::inc(&shard.stats.login_timeouts);
                        return Err("login timeout");
                    }
                    Some(Ok(0)) => return Err("closed by peer"),
                    Some(Ok(_)) => {}
                    Some(Err(_)) => return Err("read error"),
                }
            }
            Err(e @ (DecodeError::InvalidImei | DecodeError::LoginLength(_))) => {
                ShardStats::inc(&shard.stats.logins_rejected);
                tracing::info!(shard = shard.id, error = %e, "Login refused.");
                let _ = stream.write_all(&[LOGIN_REJECT]).await;
                return Err("bad login");
            }
            Err(e) => {
                ShardStats::inc(&shard.stats.decode_errors);
                tracing::info!(shard = shard.id, error = %e, "Garbage instead of a login.");
                return Err("garbage before login");
            }
        }
    }
}

fn session_event(
    shard: &Shard,
    imei: Imei,
    event: &'static str,
    peer: Option<SocketAddr>,
    reason: Option<String>,
) {
    let ev = SessionEvent {
        imei: imei.as_u64(),
        event,
        at: SystemTime::now(),
        shard: shard.id as u32,
        transport: "tcp",
        peer: peer.map(|p| p.to_string()),
        reason,
    };
    shard.writer.send_event(ev);
}

/// The session of a logged-in device on its owning shard.
async fn session(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    conn: ConnGuard,
    imei: Imei,
    peer: Option<SocketAddr>,
    mut rb: ReadBuf,
) {
    let replaced = shard.devices.borrow_mut().attach(imei, (conn.id, conn.fd));
    if let Some((_, old_fd)) = replaced {
        ShardStats::inc(&shard.stats.replaced);
        tracing::info!(shard = shard.id, %imei, "New connection replaces the previous one.");
        shut_read(old_fd);
    }
    if stream.write_all(&[LOGIN_ACCEPT]).await.is_err() {
        shard.devices.borrow_mut().detach(imei, conn.id);
        return;
    }
    ShardStats::inc(&shard.stats.logins_accepted);
    tracing::debug!(shard = shard.id, %imei, peer = ?peer, "Device logged in.");
    session_event(&shard, imei, "connect", peer, None);

    let (mut rd, wr) = stream.split();
    let (ack_tx, ack_rx) =
        local_channel::new_bounded(shard.config.max_frames_in_flight_per_connection);
    let acker = glommio::spawn_local(acker(shard.clone(), wr, ack_rx, conn.fd, imei));
    let mut reason = read_loop(&shard, &mut rd, &mut rb, imei, &ack_tx).await;
    drop(ack_tx);
    if let Some(r) = acker.await {
        reason = r.to_string();
    }
    let still_ours = shard
        .devices
        .borrow()
        .get(imei)
        .and_then(|d| d.conn)
        .is_some_and(|(id, _)| id == conn.id);
    if !still_ours {
        reason = "replaced by a new connection".into();
    } else if shard.is_stopping() {
        reason = "gateway shutdown".into();
    }
    shard.devices.borrow_mut().detach(imei, conn.id);
    tracing::debug!(shard = shard.id, %imei, reason, "Device disconnected.");
    session_event(&shard, imei, "disconnect", peer, Some(reason));
    drop(conn);
}

/// Decodes and forwards frames until the connection ends; returns why it ended.
async fn read_loop(
    shard: &Shard,
    rd: &mut ReadHalf<TcpStream>,
    rb: &mut ReadBuf,
    imei: Imei,
    acks: &LocalSender<Submitted>,
) -> String {
    let idle = shard.config.idle_timeout();
    loop {
        match decode_frame(rb.data(), shard.config.max_frame_len) {
            Ok(Status::Complete((frame, used))) => {
                match frame {
                    Frame::Ping => {}
                    Frame::Avl(avl) => {
                        ShardStats::inc(&shard.stats.frames_received);
                        let submitted = match shard.submit(imei, &avl).await {
                            Ok(s) => s,
                            Err(SubmitError::Stopping) => return "shard stopping".into(),
                            Err(SubmitError::WriterUnavailable) => {
                                return "writer unavailable".into()
                            }
                        };
                        if acks.send(submitted).await.is_err() {
                            return "acker stopped".into();
                        }
                    }
                    Frame::Command(c) => {
                        ShardStats::inc(&shard.stats.commands_received);
                        tracing::info!(shard = shard.id, %imei, codec = ?c.codec, kind = c.kind, text = c.text().unwrap_or(""), "Command frame from device.");
                    }
                    Frame::Login(_) => {
                        ShardStats::inc(&shard.stats.decode_errors);
                        return "second login on a session".into();
                    }
                }
                rb.consume(used);
            }
            Ok(Status::Partial(_)) => match with_timeout(idle, rb.fill(rd)).await {
                None => {
                    ShardStats::inc(&shard.stats.idle_timeouts);
                    return "idle timeout".into();
                }
                Some(Ok(0)) => return "closed by peer".into(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("read error: {e}"),
            },
            Err(e) => {
                ShardStats::inc(&shard.stats.decode_errors);
                tracing::warn!(shard = shard.id, %imei, error = %e, "Bad frame; closing the connection.");
                return format!("bad frame: {e}");
            }
        }
    }
}

/// Answers frames in order as their commits come back. After a failure nothing more is acked
/// (acks are positional: a later ack would be taken for the failed frame), and the reader is
/// stopped; the device resends. Returns why it broke the connection, if it did.
async fn acker(
    shard: Rc<Shard>,
    mut wr: WriteHalf<TcpStream>,
    pending: LocalReceiver<Submitted>,
    fd: RawFd,
    imei: Imei,
) -> Option<&'static str> {
    let mut broken = None;
    while let Some(p) = pending.recv().await {
        let outcome = p.done.await.unwrap_or(WriteOutcome::Failed);
        if broken.is_some() {
            continue;
        }
        match outcome {
            WriteOutcome::Committed => {
                if wr.write_all(&encode_record_ack(p.records)).await.is_err() {
                    broken = Some("ack write failed");
                    shut_read(fd);
                } else {
                    shard
                        .stats
                        .records_acked
                        .fetch_add(p.records as u64, Ordering::Relaxed);
                    shard.count_stored(imei, p.records);
                }
            }
            WriteOutcome::Failed => {
                ShardStats::inc(&shard.stats.frames_failed);
                broken = Some("records refused by the database");
                shut_read(fd);
            }
        }
    }
    broken
}
