//! The process's resource limits that `serve` depends on, checked on the main thread before
//! anything starts. Descriptors (RLIMIT_NOFILE): every device connection is one, and a limit
//! below the connection cap turns a fleet reconnecting at once into failed accepts. Locked
//! memory (RLIMIT_MEMLOCK): glommio will not start a shard's io_uring below 512 KiB. Soft
//! limits are raised to the hard ones where that helps (an unprivileged process may); what is
//! still short is said loudly, with the limit to raise and how.

use crate::config::{Config, LogFormat};

/// Descriptors a gateway holds besides device connections, per shard: its TCP listener and
/// UDP socket, glommio's three io_uring rings and their eventfds, a socket in hand-over.
const PER_SHARD: u64 = 16;

/// Process-wide descriptors besides device connections: the API's connections (its cap,
/// `control::api::MAX_CONNECTIONS`), the control thread's database pool
/// (`control::POOL_SIZE`), the event deliverer's and the housekeeper's connections, the
/// runtimes' epoll and eventfds, standard streams, the managed PostgreSQL's pipes.
const PROCESS: u64 = 256 + 8 + 2 + 64;

/// Webhook requests one route may have in flight (`control::events`), a connection each.
const PER_ROUTE: u64 = 32;

/// What [`check_descriptors`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft limit at start.
    pub soft_before: u64,
    /// The soft limit now (raised to the hard limit when that helped).
    pub soft: u64,
    pub hard: u64,
    /// What the configuration may need: shards x max_connections_per_shard + [`margin`].
    pub needed: u64,
}

impl Descriptors {
    /// Whether the limit covers what the connection cap may need.
    pub fn enough(&self) -> bool {
        self.soft >= self.needed
    }
}

/// Descriptors needed besides device connections (see [`PER_SHARD`], [`PROCESS`]).
pub fn margin(cfg: &Config) -> u64 {
    PER_SHARD * cfg.shards as u64
        + PROCESS
        + cfg.writer_connections as u64
        + PER_ROUTE * cfg.routes.len() as u64
}

/// Descriptors the configuration may need at its connection cap.
pub fn needed(cfg: &Config) -> u64 {
    (cfg.shards as u64)
        .saturating_mul(cfg.max_connections_per_shard as u64)
        .saturating_add(margin(cfg))
}

/// The soft limit to ask for: the hard limit, when the soft one is short of `needed` and the
/// hard one is above it (raising up to the hard limit needs no privilege). `None`: leave it.
pub fn raise_to(soft: u64, hard: u64, needed: u64) -> Option<u64> {
    (soft < needed && hard > soft).then_some(hard)
}

/// Reads RLIMIT_NOFILE, raises the soft limit to the hard one if it is short of what `cfg`
/// may need, and logs what it did. When the limit stays short: a warning in the log and,
/// with text logs, a plain line on standard error too (seen even when the log filter hides
/// warnings; with JSON logs it would break the one-object-per-line stream). Never fails:
/// a gateway under a low limit still serves what the limit allows.
pub fn check_descriptors(cfg: &Config) -> Descriptors {
    let needed = needed(cfg);
    let (soft_before, hard) = match get_nofile() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the descriptor limit (RLIMIT_NOFILE).");
            return Descriptors {
                soft_before: 0,
                soft: u64::MAX,
                hard: u64::MAX,
                needed,
            };
        }
    };
    let mut soft = soft_before;
    if let Some(target) = raise_to(soft, hard, needed) {
        match set_nofile(target, hard) {
            Ok(()) => {
                soft = target;
                tracing::info!(
                    from = soft_before,
                    to = soft,
                    "Raised the descriptor soft limit to the hard limit."
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, to = target, "Cannot raise the descriptor soft limit.")
            }
        }
    }
    let d = Descriptors {
        soft_before,
        soft,
        hard,
        needed,
    };
    if !d.enough() {
        tracing::warn!(
            limit = soft,
            hard_limit = hard,
            needed,
            shards = cfg.shards,
            max_connections_per_shard = cfg.max_connections_per_shard,
            "Descriptor limit (RLIMIT_NOFILE) below what the connection cap may need: past it, \
             devices cannot connect (accepts fail, counted in fleetgate_accept_errors_total). \
             Raise the hard limit: LimitNOFILE= in the systemd unit (tuning/fleetgate.service), \
             or `ulimit -n` before starting (above the hard limit: as root, or nofile in \
             /etc/security/limits.conf); or lower max_connections_per_shard. See \
             tuning/kernel-limits.md."
        );
        if cfg.log_format == LogFormat::Text {
            eprintln!(
                "fleetgate: warning: the descriptor limit is {soft} (hard {hard}), but \
                 {shards} shards x max_connections_per_shard {max} may need {needed}: fewer \
                 than {soft} devices can be connected at once. Raise it: \
                 LimitNOFILE={needed} (systemd) or `ulimit -n {needed}`; see \
                 tuning/kernel-limits.md.",
                shards = cfg.shards,
                max = cfg.max_connections_per_shard,
            );
        }
    }
    d
}

/// The least locked memory glommio 0.9 starts an executor with (`MIN_MEMLOCK_LIMIT` in its
/// reactor): below it every shard thread ends before it is ready, silently.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Locked memory that lets glommio register its I/O buffer (10 MiB, `io_memory`) with each of a
/// shard's three rings, counted per ring by the kernel unless the process has CAP_IPC_LOCK.
/// Without it glommio logs "registering buffers ... Skipping" and goes on unregistered.
pub const MEMLOCK_PER_SHARD: u64 = 3 * (10 << 20);

/// Raises the soft RLIMIT_MEMLOCK to the hard one when it is short of what the shards'
/// io_uring rings use, and refuses to go on below glommio's minimum: the shards would not
/// start, and `serve` would only see them time out.
///
/// # Errors
/// The limit stays below [`MIN_MEMLOCK`]; the message names the limit and how to raise it.
pub fn check_memlock(cfg: &Config) -> Result<(), String> {
    let Ok((soft_before, hard)) = get(libc::RLIMIT_MEMLOCK) else {
        return Ok(()); // glommio reads it again and says what it finds
    };
    let wanted = MEMLOCK_PER_SHARD.saturating_mul(cfg.shards as u64);
    let mut soft = soft_before;
    if let Some(target) = raise_to(soft, hard, wanted) {
        if set(libc::RLIMIT_MEMLOCK, target, hard).is_ok() {
            soft = target;
            tracing::info!(
                from = soft_before,
                to = soft,
                "Raised the locked-memory soft limit to the hard limit."
            );
        }
    }
    if soft < MIN_MEMLOCK {
        return Err(format!(
            "the locked-memory limit (RLIMIT_MEMLOCK) is {soft} bytes (hard {hard}); the \
             shards' io_uring (glommio) needs at least {MIN_MEMLOCK}, about {wanted} for \
             {shards} shards. Raise it: LimitMEMLOCK=infinity in the systemd unit \
             (tuning/fleetgate.service), `ulimit -l unlimited` before starting, or memlock in \
             /etc/security/limits.conf; see tuning/io_uring-memlock.md",
            shards = cfg.shards
        ));
    }
    Ok(())
}

fn get_nofile() -> std::io::Result<(u64, u64)> {
    get(libc::RLIMIT_NOFILE)
}

fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    set(libc::RLIMIT_NOFILE, soft, hard)
}

/// The type of getrlimit's resource argument, which differs between C libraries.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

/// getrlimit(2): (soft, hard), RLIM_INFINITY as `u64::MAX`.
fn get(resource: Resource) -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit into `l`.
    if unsafe { libc::getrlimit(resource, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur as u64, l.rlim_max as u64))
}

fn set(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit(2) reads one rlimit.
    if unsafe { libc::setrlimit(resource, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_only_when_short_and_the_hard_limit_allows() {
        assert_eq!(raise_to(1024, 524_288, 100_000), Some(524_288));
        // Raised even when the hard limit is short too: more devices fit.
        assert_eq!(raise_to(1024, 20_000, 100_000), Some(20_000));
        assert_eq!(
            raise_to(20_000, 20_000, 100_000),
            None,
            "nothing to raise to"
        );
        assert_eq!(raise_to(200_000, 524_288, 100_000), None, "already enough");
    }

    #[test]
    fn what_the_connection_cap_needs() {
        let cfg = Config {
            shards: 2,
            max_connections_per_shard: 50_000,
            ..Config::default()
        };
        assert_eq!(needed(&cfg), 100_000 + margin(&cfg));
        assert_eq!(margin(&cfg), 2 * PER_SHARD + PROCESS + 2);
        let with_routes = Config {
            routes: vec![
                crate::config::RouteConfig {
                    name: None,
                    topics: vec!["#".into()],
                    url: "http://127.0.0.1:9/".into(),
                    secret: "s".into(),
                };
                2
            ],
            ..cfg.clone()
        };
        assert_eq!(margin(&with_routes), margin(&cfg) + 2 * PER_ROUTE);
        let huge = Config {
            shards: 1024,
            max_connections_per_shard: usize::MAX,
            ..cfg
        };
        assert_eq!(needed(&huge), u64::MAX, "saturates rather than wraps");
    }
}
