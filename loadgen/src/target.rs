//! Where loadgen may send traffic. A load generator pointed at the wrong address is a
//! denial-of-service tool, so by default it only talks to this machine: `--addr` (and the
//! `--verify-database-url` host) must be loopback, 127.0.0.0/8 or ::1, unless
//! `--allow-remote` says otherwise. The check runs before any name is resolved, so a refused
//! target costs not even a DNS query.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Whether `ip` is on this machine's loopback: 127.0.0.0/8, ::1, or 127/8 mapped into IPv6.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a host name is one that always means this machine.
fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost")
}

/// Resolves the gateway address `addr` (`IP:PORT` or `HOST:PORT`), refusing anything off this
/// machine unless `allow_remote`.
///
/// # Errors
/// An address that does not parse or resolve, or a non-loopback one without `allow_remote`.
pub fn resolve_target(addr: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let refuse = |what: &str| {
        format!(
            "--addr {addr}: {what} is not a loopback address (127.0.0.0/8 or ::1); loadgen \
             sends load only to this machine unless --allow-remote is given"
        )
    };
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return if allow_remote || is_loopback(sa.ip()) {
            Ok(sa)
        } else {
            Err(refuse(&sa.ip().to_string()))
        };
    }
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("--addr {addr} is not HOST:PORT"))?;
    if !allow_remote && !is_loopback_name(host) {
        return Err(refuse(host));
    }
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving --addr {addr}: {e}"))?
        .collect();
    // `localhost` may also resolve to something else in a strange hosts file: take a
    // loopback answer, and refuse if there is none.
    all.iter()
        .find(|a| allow_remote || is_loopback(a.ip()))
        .copied()
        .ok_or_else(|| {
            if all.is_empty() {
                format!("--addr {addr} resolves to nothing")
            } else {
                refuse(host)
            }
        })
}

/// Checks that a PostgreSQL connection string only reaches this machine (unix sockets or
/// loopback hosts) unless `allow_remote`.
///
/// # Errors
/// A string that does not parse, or a TCP host off this machine.
pub fn check_database_url(url: &str, allow_remote: bool) -> Result<(), String> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("--verify-database-url does not parse: {e}"))?;
    if allow_remote {
        return Ok(());
    }
    for host in cfg.get_hosts() {
        if let tokio_postgres::config::Host::Tcp(name) = host {
            let ok = match name.parse::<IpAddr>() {
                Ok(ip) => is_loopback(ip),
                Err(_) => is_loopback_name(name),
            };
            if !ok {
                return Err(format!(
                    "--verify-database-url host {name} is not loopback; give --allow-remote to \
                     use it"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_pass() {
        for a in [
            "127.0.0.1:5027",
            "127.1.2.3:1",
            "[::1]:5027",
            "[::ffff:127.0.0.9]:80",
        ] {
            let sa = resolve_target(a, false).unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(sa.to_string().parse::<SocketAddr>().unwrap(), sa);
        }
        let sa = resolve_target("localhost:5027", false).unwrap();
        assert!(is_loopback(sa.ip()) && sa.port() == 5027);
    }

    #[test]
    fn other_addresses_are_refused_without_allow_remote() {
        for a in [
            "10.0.0.1:5027",
            "192.168.1.10:5027",
            "8.8.8.8:53",
            "0.0.0.0:5027",
            "[2001:db8::1]:5027",
            "[::ffff:10.0.0.1]:5027",
            // Never resolved: a name other than localhost is refused as written.
            "gateway.example.com:5027",
        ] {
            let e = resolve_target(a, false).expect_err(a);
            assert!(e.contains("--allow-remote"), "{a}: {e}");
        }
        assert_eq!(
            resolve_target("10.0.0.1:5027", true).unwrap(),
            "10.0.0.1:5027".parse().unwrap()
        );
        assert!(resolve_target("nonsense", false).is_err());
    }

    #[test]
    fn database_hosts_must_be_local() {
        assert!(check_database_url("postgres://u@127.0.0.1:5432/db", false).is_ok());
        assert!(check_database_url("postgres://u@localhost/db", false).is_ok());
        assert!(check_database_url("host=/tmp/fg user=postgres", false).is_ok());
        assert!(check_database_url("postgres://u@db.example.com/db", false).is_err());
        assert!(check_database_url("host=10.1.1.1 user=x", false).is_err());
        assert!(check_database_url("host=10.1.1.1 user=x", true).is_ok());
    }
}
