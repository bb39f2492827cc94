//! API keys and their scopes. Parsed on the main thread at start (so a bad key stops `serve`
//! before anything runs), checked on the control thread for every request.
//!
//! A key is presented as `x-api-key: KEY` or `Authorization: Bearer KEY`. It is compared with
//! every configured key in constant time ([`subtle`]), so the time a request takes does not
//! tell how many leading bytes of a guess were right, nor which key matched; only a length
//! difference ends a comparison early, which tells an attacker the length at most. Keys never
//! appear in logs or errors: an entry is named by its position.

use hyper::header::{HeaderMap, AUTHORIZATION};
use subtle::{ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};

/// The environment variable that adds keys to the configured ones (`k1:command,k2:read`), so
/// that keys need not be written into a configuration file.
pub const ENV_VAR: &str = "FLEETGATE_API_KEYS";

/// What a key allows. `Command` includes everything `Read` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Devices, stats, command history.
    Read = 1,
    /// Also sending and cancelling commands.
    Command = 2,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Command => "command",
        }
    }
}

/// Splits a `KEY:SCOPE` entry (at its last `:`, so a key may contain one).
///
/// # Errors
/// What is wrong with the entry, without the key in it.
pub fn parse_key(entry: &str) -> Result<(Vec<u8>, Scope), String> {
    let Some((key, scope)) = entry.trim().rsplit_once(':') else {
        return Err("not of the form KEY:SCOPE".into());
    };
    let scope = match scope {
        "read" => Scope::Read,
        "command" => Scope::Command,
        _ => return Err("scope must be `read` or `command`".into()),
    };
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    // Must travel in a header unchanged, and in FLEETGATE_API_KEYS between commas.
    if !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err("the key must be printable ASCII without spaces or commas".into());
    }
    Ok((key.as_bytes().to_vec(), scope))
}

/// The keys the API accepts.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<(Vec<u8>, Scope)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Why a request was not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No key presented (401).
    Missing,
    /// A key no configured key equals (401).
    Wrong,
    /// A valid key without the scope the endpoint needs (403).
    Scope,
}

impl Denied {
    /// A stable name, for the metrics label and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Denied::Missing => "missing_key",
            Denied::Wrong => "wrong_key",
            Denied::Scope => "scope",
        }
    }
}

impl ApiKeys {
    /// The configured entries plus those of [`ENV_VAR`] (`env`, when set).
    ///
    /// # Errors
    /// An entry that does not parse, named by its source and position.
    pub fn load(config: &[String], env: Option<&str>) -> Result<ApiKeys, String> {
        let mut keys = Vec::new();
        for (n, e) in config.iter().enumerate() {
            keys.push(parse_key(e).map_err(|why| format!("api_keys entry {}: {why}", n + 1))?);
        }
        if let Some(env) = env {
            for (n, e) in env.split(',').filter(|e| !e.trim().is_empty()).enumerate() {
                keys.push(parse_key(e).map_err(|why| format!("{ENV_VAR} entry {}: {why}", n + 1))?);
            }
        }
        Ok(ApiKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The widest scope of the configured keys equal to `presented`, if any. Every configured
    /// key is compared, whatever matched before.
    pub fn scope_of(&self, presented: &[u8]) -> Option<Scope> {
        let mut best = 0u8;
        for (key, scope) in &self.keys {
            let candidate = *scope as u8;
            let take = key.as_slice().ct_eq(presented) & candidate.ct_gt(&best);
            best.conditional_assign(&candidate, take);
        }
        match best {
            1 => Some(Scope::Read),
            2 => Some(Scope::Command),
            _ => None,
        }
    }

    /// Lets a request through when it presents a key with scope `needed` (or wider).
    ///
    /// # Errors
    /// Why not.
    pub fn check(&self, headers: &HeaderMap, needed: Scope) -> Result<Scope, Denied> {
        let presented = presented_key(headers).ok_or(Denied::Missing)?;
        let scope = self.scope_of(presented).ok_or(Denied::Wrong)?;
        if scope < needed {
            return Err(Denied::Scope);
        }
        Ok(scope)
    }
}

/// The key of a request: `x-api-key`, else an `Authorization: Bearer` token.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let auth = headers.get(AUTHORIZATION)?.as_bytes();
    // The scheme is case-insensitive (RFC 9110, 11.1).
    if auth.len() > 7 && auth[..7].eq_ignore_ascii_case(b"bearer ") {
        return Some(auth[7..].trim_ascii());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn entries_parse_or_say_what_is_wrong_without_the_key() {
        assert_eq!(
            parse_key("abc:read").unwrap(),
            (b"abc".to_vec(), Scope::Read)
        );
        assert_eq!(
            parse_key("a:b:command").unwrap(),
            (b"a:b".to_vec(), Scope::Command)
        );
        for bad in ["secret", "secret:admin", ":read", "sec ret:read"] {
            let e = parse_key(bad).unwrap_err();
            assert!(!e.contains("secret") && !e.contains("sec ret"), "{e}");
        }
        let e = ApiKeys::load(&["k:read".into()], Some("a:read,b:root")).unwrap_err();
        assert_eq!(
            e,
            "FLEETGATE_API_KEYS entry 2: scope must be `read` or `command`"
        );
        let keys = ApiKeys::load(&[], Some(" k1:command , k2:read,")).unwrap();
        assert_eq!(keys.scope_of(b"k1"), Some(Scope::Command));
        assert_eq!(keys.scope_of(b"k2"), Some(Scope::Read));
    }

    #[test]
    fn a_request_needs_a_known_key_with_the_scope() {
        let keys = ApiKeys::load(
            &["r:read".into(), "c:command".into(), "r:command".into()],
            None,
        )
        .unwrap();
        let need = |h: &[(&'static str, &str)], s| keys.check(&headers(h), s);
        assert_eq!(need(&[], Scope::Read), Err(Denied::Missing));
        assert_eq!(
            need(&[("x-api-key", "nope")], Scope::Read),
            Err(Denied::Wrong)
        );
        assert_eq!(
            need(&[("x-api-key", "c")], Scope::Command),
            Ok(Scope::Command)
        );
        assert_eq!(
            need(&[("authorization", "Bearer c")], Scope::Read),
            Ok(Scope::Command)
        );
        assert_eq!(
            need(&[("authorization", "bearer  c ")], Scope::Read),
            Ok(Scope::Command)
        );
        assert_eq!(
            need(&[("authorization", "Basic c")], Scope::Read),
            Err(Denied::Missing)
        );
        // A key listed twice has the wider of its scopes.
        assert_eq!(
            need(&[("x-api-key", "r")], Scope::Command),
            Ok(Scope::Command)
        );
        let read_only = ApiKeys::load(&["r:read".into()], None).unwrap();
        assert_eq!(
            read_only.check(&headers(&[("x-api-key", "r")]), Scope::Command),
            Err(Denied::Scope)
        );
        assert_eq!(read_only.scope_of(b"rr"), None);
        assert_eq!(read_only.scope_of(b""), None);
    }
}
