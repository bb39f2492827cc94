//! The shard executor: the body of each shard thread (one glommio executor per core). Binds the
//! shard's SO_REUSEPORT TCP listener and UDP socket, accepts connections and runs their
//! sessions (`crate::conn`), serves the shard's inbox, and stops in order. Runs on a shard.
//!
//! The kernel spreads new connections over the shards' listeners; the shard that accepts a
//! connection reads its login and hands the socket to the device's owning shard
//! ([`crate::shard::shard_for`]) through that shard's inbox.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::future::{select, Either, FutureExt};
use futures::StreamExt;
use glommio::net::{TcpListener, UdpSocket};
use glommio::timer::Timer;

use crate::config::Config;
use crate::log_every::LogEvery;
use crate::session::CloseReason;
use crate::shard::{
    spawn_detached, with_timeout, Cancel, ConnGuard, Shard, ShardLinks, ShardMsg, ShardStats,
};

/// What a shard thread is started with.
pub struct ShardSpec {
    pub links: ShardLinks,
    /// The resolved device address (port already chosen).
    pub device_addr: SocketAddr,
    pub inbox: UnboundedReceiver<ShardMsg>,
}

/// Submission-queue depth of each shard's io_uring rings (glommio's default is 128).
///
/// Not for throughput: the kernel sizes a ring's cancellation hash table from its completion
/// queue (`ilog2(cq_entries) - 5` bits, at most 8), and every armed socket poll sits in it. An
/// idle connection keeps a poll armed, and glommio cancels its preemption timer on every reactor
/// turn; each cancel walks one bucket. At 128 the table has 8 buckets: with 9,500 connections
/// per shard a cancel walked ~1,200 entries, and the shards spent half their CPU there at fleet
/// scale (tuning/fleet-scale.md, "CPU per record"). 4,096 gives the most buckets the kernel
/// makes (256); the rings cost ~0.4 MiB more each, charged to the memory cgroup, not to
/// RLIMIT_MEMLOCK.
pub const RING_DEPTH: usize = 4096;

/// How long connections get, after the shutdown deadline aborted them, to be gone.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// The body of a shard thread: bind, report readiness, serve until told to stop.
///
/// `ready` is answered once, with the bind result, so `serve` fails loudly if a shard cannot
/// start. Stopping takes at most `shutdown_timeout` plus [`ABORT_GRACE`]: connections are told
/// to finish (stop reading, ack what commits); at the deadline, whatever is left is aborted.
pub async fn run(
    spec: ShardSpec,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    shutdown_timeout: Duration,
) {
    let ShardSpec {
        links,
        device_addr,
        mut inbox,
    } = spec;
    let shard_id = links.id;
    let bound = bind_device_sockets(device_addr, &links.config)
        .map_err(|e| format!("shard {shard_id}: cannot bind {device_addr}: {e}"));
    let (listener, udp) = match bound {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let shard = Rc::new(Shard::new(links, stop_rx.shared()));
    // Accepting and said so before `serve` hears it: "fleetgate ready." and `/readyz` come after
    // every shard's line and flag, never before.
    shard.stats.accepting.store(true, Ordering::Relaxed);
    tracing::info!(shard = shard_id, addr = %device_addr, "Shard listening.");
    let _ = ready.send(Ok(()));

    let accept = glommio::spawn_local(accept_loop(shard.clone(), listener));
    let udp = glommio::spawn_local(crate::conn::udp::serve(shard.clone(), Rc::new(udp)));
    let expiry = glommio::spawn_local(expire_devices(shard.clone()));

    // The inbox: handed-over connections, stored-record counts, policy changes, the order to stop.
    while let Some(msg) = inbox.next().await {
        match msg {
            ShardMsg::Adopt {
                fd,
                imei,
                peer,
                pending,
            } => crate::conn::tcp::adopt(&shard, fd, imei, peer, pending),
            ShardMsg::Stored {
                imei,
                records,
                at_ms,
            } => shard.stored(imei, records, at_ms),
            ShardMsg::PolicyChanged => shard.enforce_policy(),
            ShardMsg::ListDevices {
                range,
                after,
                limit,
                reply,
            } => {
                let page = shard.devices.borrow().page(shard.id, range, after, limit);
                let _ = reply.send(page);
            }
            ShardMsg::GetDevice { imei, reply } => {
                let _ = reply.send(shard.devices.borrow().info(shard.id, imei));
            }
            ShardMsg::SendCommand { id, imei, frame } => shard.send_command(id, imei, frame),
            ShardMsg::Shutdown => break,
        }
    }

    // Stop: no new connections or datagrams; sessions stop reading, in-flight frames commit and
    // are acked; at the deadline the rest is aborted (unacked frames are resent by devices).
    shard.stats.accepting.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(());
    accept.await;
    udp.await;
    drop(expiry);
    shard.cancel_all(Cancel::Graceful(CloseReason::Shutdown));
    let closed = shard.gate.close().fuse();
    futures::pin_mut!(closed);
    if with_timeout(shutdown_timeout, &mut closed).await.is_none() {
        tracing::warn!(
            shard = shard_id,
            connections = shard.conns.borrow().len(),
            "Shutdown deadline passed with frames still in flight; aborting."
        );
        shard.cancel_all(Cancel::Abort(CloseReason::Shutdown));
        if with_timeout(ABORT_GRACE, &mut closed).await.is_none() {
            tracing::warn!(
                shard = shard_id,
                "Tasks still waiting after the abort; leaving them."
            );
        }
    }
    tracing::info!(shard = shard_id, "Shard stopped.");
}

/// Forgets UDP-only devices silent for longer than the idle timeout (TCP devices leave the
/// table with their connection).
async fn expire_devices(shard: Rc<Shard>) {
    let idle = shard.config.idle_timeout();
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        Timer::new(every).await;
        let before_ms = (crate::time::unix_now_ms()).saturating_sub(idle.as_millis() as u64);
        shard.devices.borrow_mut().expire(before_ms);
    }
}

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
/// (so a restarted gateway can bind while its predecessor's closed connections linger, so
/// `serve`'s plain probe bind conflicts only with a live listener, and so that they bind
/// beside the sockets `serve` holds a port-0 pick with, [`crate::server::DevicePort`]).
fn bind_device_sockets(
    addr: SocketAddr,
    cfg: &Config,
) -> std::io::Result<(TcpListener, UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let domain = Domain::for_address(addr);
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(cfg.listen_backlog)?;
    // SAFETY: a bound, listening socket whose ownership moves into the listener.
    let listener = unsafe { TcpListener::from_raw_fd(tcp.into_raw_fd()) };
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_reuse_address(true)?;
    udp.set_reuse_port(true)?;
    set_udp_receive_buffer(&udp, cfg.udp_recv_buffer_bytes);
    udp.bind(&addr.into())?;
    // SAFETY: a bound socket whose ownership moves into the glommio socket.
    let udp = unsafe { UdpSocket::from_raw_fd(udp.into_raw_fd()) };
    Ok((listener, udp))
}

/// The configured kernel buffers of a device connection (kept through a hand-over: the
/// duplicated descriptor is the same socket).
fn set_buffers(stream: &glommio::net::TcpStream, cfg: &Config) {
    // SAFETY: the descriptor is open for the whole call (the stream is borrowed).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    if cfg.tcp_send_buffer_bytes > 0 {
        let _ = sock.set_send_buffer_size(cfg.tcp_send_buffer_bytes);
    }
    if cfg.tcp_recv_buffer_bytes > 0 {
        let _ = sock.set_recv_buffer_size(cfg.tcp_recv_buffer_bytes);
    }
}

/// At most one "Accept failed" line per shard this often. The first failure after a quiet
/// spell is logged at once, so a second episode of running out of descriptors is never silent
/// (counting in powers of two over the process's life could hide it for hours).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let accept_failed = LogEvery::new(ACCEPT_ERROR_LOG_EVERY);
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
                // Out of descriptors and the like: counted, logged (not once per failed
                // accept), and a moment for the system before the next try.
                ShardStats::inc(&shard.stats.accept_errors);
                if let Some(held_back) = accept_failed.ready() {
                    // `failures`: since the last line, this one included.
                    let failures = held_back + 1;
                    tracing::warn!(shard = shard.id, error = %e, failures, "Accept failed: devices cannot connect meanwhile (out of descriptors? see tuning/kernel-limits.md).");
                }
                Timer::new(Duration::from_millis(10)).await;
                continue;
            }
        };
        ShardStats::inc(&shard.stats.connections_accepted);
        set_buffers(&stream, &shard.config);
        let Some(conn) = ConnGuard::register(&shard) else {
            continue; // over the cap: counted and logged; `stream` closes here
        };
        spawn_detached(
            &shard.gate,
            crate::conn::tcp::accepted(shard.clone(), stream, conn),
        );
    }
}

#[cfg(test)]
mod ring_tests {
    use super::RING_DEPTH;

    /// The kernel's cancellation hash (io_uring/io_uring.c, `io_ring_ctx_alloc`): completion
    /// queue twice the submission queue, `ilog2(cq_entries) - 5` bits, clamped to 1..=8.
    fn cancel_buckets(sq_depth: usize) -> usize {
        let cq = 2 * sq_depth;
        let bits = (cq.ilog2() as i64 - 5).clamp(1, 8);
        1 << bits
    }

    #[test]
    fn the_rings_get_the_most_cancellation_buckets_the_kernel_gives() {
        assert_eq!(cancel_buckets(128), 8, "glommio's default");
        assert_eq!(cancel_buckets(RING_DEPTH), 256);
    }
}
