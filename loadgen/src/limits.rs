//! The descriptor limit. Every TCP device holds one socket, so a process of N devices needs N
//! descriptors plus a few of its own; past the soft limit (RLIMIT_NOFILE) connects fail with
//! EMFILE, which looks like a gateway refusing connections. At start loadgen raises the soft
//! limit to the hard one and says clearly when the devices still do not fit: then only
//! `--processes` helps (the hard limit of an unprivileged process cannot be raised).

use std::io;

/// Descriptors a process needs besides its devices: stdio, the runtime's epoll and wakers,
/// a database connection, slack for sockets closing while others open.
pub const OVERHEAD: u64 = 64;

/// RLIMIT_NOFILE of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

/// Reads RLIMIT_NOFILE.
///
/// # Errors
/// getrlimit failed.
pub fn nofile() -> io::Result<NoFile> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NoFile {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft limit to the hard one; returns the limit now in force.
///
/// # Errors
/// getrlimit or setrlimit failed.
pub fn raise_nofile() -> io::Result<NoFile> {
    let now = nofile()?;
    if now.soft >= now.hard {
        return Ok(now);
    }
    let r = libc::rlimit {
        rlim_cur: now.hard as libc::rlim_t,
        rlim_max: now.hard as libc::rlim_t,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    nofile()
}

/// What to tell the user about `devices` devices per process under `limit` (after raising),
/// `before` being the soft limit found at start; `None` when they fitted from the start.
pub fn warning(devices: u64, before: u64, limit: NoFile) -> Option<String> {
    let need = devices + OVERHEAD;
    if need <= before {
        return None;
    }
    if need <= limit.soft {
        return Some(format!(
            "WARNING: {devices} devices need about {need} file descriptors, more than this \
             process's soft limit of {before}: raised it to the hard limit, {}.",
            limit.soft
        ));
    }
    let per_process = limit.hard.saturating_sub(OVERHEAD).max(1);
    let processes = devices.div_ceil(per_process);
    let raised = if limit.soft > before {
        format!(" (raised from {before})")
    } else {
        String::new()
    };
    Some(format!(
        "WARNING: {devices} devices in one process need about {need} file descriptors, but this \
         process may open {}{raised}, hard limit {}: connects past that fail with 'too many open \
         files' (counted as connect errors, cause no_descriptor). Run --processes {processes} or \
         more, or raise the hard limit (ulimit -Hn).",
        limit.soft, limit.hard
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_when_devices_do_not_fit() {
        let l = NoFile {
            soft: 20_000,
            hard: 20_000,
        };
        assert_eq!(warning(10_000, 20_000, l), None);
        let w = warning(10_000, 1024, l).unwrap();
        assert!(
            w.contains("soft limit of 1024: raised it") && !w.contains("--processes"),
            "{w}"
        );
        let w = warning(36_000, 20_000, l).unwrap();
        assert!(w.contains("--processes 2"), "{w}");
        assert!(!w.contains("raised"));
        let w = warning(
            5_000,
            1024,
            NoFile {
                soft: 4096,
                hard: 4096,
            },
        )
        .unwrap();
        assert!(
            w.contains("raised from 1024") && w.contains("--processes 2"),
            "{w}"
        );
    }

    #[test]
    fn the_limit_can_be_read_and_raising_never_lowers_it() {
        let before = nofile().unwrap();
        let after = raise_nofile().unwrap();
        assert!(after.soft >= before.soft && after.soft <= after.hard);
    }
}
