//! Routes (the `[[routes]]` tables of the config) and where they send events: a small
//! [`Destination`] trait with one implementation now, [`Webhook`] (HTTP POST, signed).
//! Runs on the control thread.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::sign::{signature_header, EVENT_ID_HEADER, SIGNATURE_HEADER};
use super::topic::TopicFilter;
use crate::config::RouteConfig;

/// One event as read from the outbox, on its way to a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The inserting transaction's id: with `id`, the delivery order.
    pub tx: i64,
    /// The event id (unique; the receiver's de-duplication key).
    pub id: i64,
    pub topic: String,
    pub imei: u64,
    /// When it was published, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The `data` object, as JSON text.
    pub data: String,
}

impl OutboxEvent {
    /// The order key: (tx, id).
    pub fn key(&self) -> (i64, i64) {
        (self.tx, self.id)
    }
}

/// The webhook body: `{"id","topic","time","data"}`, `id` a string of the event id's digits
/// (a string so that receivers in any language keep it exact, and so that it may change
/// form later without breaking them), `time` RFC 3339 UTC with milliseconds.
pub fn webhook_body(e: &OutboxEvent) -> String {
    let time = crate::time::utc_text(e.at_ms).unwrap_or_default();
    // `data` is JSON text the outbox holds as it was published: spliced in, not re-encoded.
    format!(
        "{{\"id\":\"{}\",\"topic\":{},\"time\":\"{}\",\"data\":{}}}",
        e.id,
        serde_json::Value::from(e.topic.as_str()),
        time,
        e.data
    )
}

/// Why a delivery attempt failed (each is retried).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("receiver answered {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the receiver: {0}")]
    Connect(String),
}

/// Where a route's events go. One implementation now ([`Webhook`]); a queue or a broker
/// later implements the same call.
pub trait Destination: Send + Sync + fmt::Debug {
    /// Delivers one event. `Ok`: the destination has it (for a webhook: a 2xx answer);
    /// `Err`: not known to have it, the deliverer tries again later (at-least-once).
    fn deliver(&self, event: &OutboxEvent) -> BoxFuture<'static, Result<(), DeliveryError>>;
}

/// A route: which topics, where to.
#[derive(Clone, Debug)]
pub struct Route {
    /// Names the route's delivery state in `event_routes`: keep it when editing the route,
    /// or its events start again from the oldest one kept.
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub destination: Arc<dyn Destination>,
}

impl Route {
    /// Whether this route takes events of `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// One PostgreSQL regex for all of the route's filters (alternatives).
    pub fn sql_regex(&self) -> String {
        let parts: Vec<String> = self
            .filters
            .iter()
            .map(|f| format!("({})", f.sql_regex()))
            .collect();
        parts.join("|")
    }
}

/// A route the config cannot have; the message names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {problem}")]
pub struct RouteError {
    /// `name` if given, else `#N (url)`.
    pub route: String,
    pub problem: String,
}

/// The route's name: its `name`, else its URL.
fn name_of(c: &RouteConfig) -> String {
    c.name.clone().unwrap_or_else(|| c.url.clone())
}

/// Checks the routes of a config: each has a name (or URL) of its own, at least one valid
/// topic filter, a non-empty secret and an `http://host[:port]/path` URL.
///
/// # Errors
/// The first bad route, named.
pub fn validate_routes(routes: &[RouteConfig]) -> Result<(), RouteError> {
    let mut names = HashSet::new();
    for (i, c) in routes.iter().enumerate() {
        let err = |problem: String| RouteError {
            route: match &c.name {
                Some(n) => format!("{n:?}"),
                None => format!("#{} ({})", i + 1, c.url),
            },
            problem,
        };
        if c.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(err("name must not be empty".into()));
        }
        if !names.insert(name_of(c)) {
            return Err(err(
                "another route has the same name (or, unnamed, the same url): give them names"
                    .into(),
            ));
        }
        if c.topics.is_empty() {
            return Err(err("topics must list at least one topic filter".into()));
        }
        for t in &c.topics {
            TopicFilter::parse(t).map_err(|e| err(e.to_string()))?;
        }
        parse_url(&c.url).map_err(err)?;
        if c.secret.is_empty() {
            return Err(err("secret must not be empty".into()));
        }
    }
    Ok(())
}

/// An `http://` URL with a host. HTTPS is refused for now (no TLS client yet): a route that
/// could never deliver must fail the start, not retry forever.
fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("url {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "url {url:?}: https is not supported yet; deliver to an http:// URL (e.g. a \
                 local TLS-terminating proxy)"
            ))
        }
        _ => return Err(format!("url {url:?} must start with http://")),
    }
    if uri.host().map_or(true, str::is_empty) {
        return Err(format!("url {url:?} has no host"));
    }
    Ok(uri)
}

/// The routes of a config, ready to deliver: one HTTP client (one connection pool) shared by
/// all webhooks, `timeout` per request (connect, send, answer).
///
/// # Errors
/// As [`validate_routes`].
pub fn routes_from_config(
    routes: &[RouteConfig],
    timeout: Duration,
) -> Result<Vec<Route>, RouteError> {
    validate_routes(routes)?;
    let client = http_client(timeout);
    Ok(routes
        .iter()
        .map(|c| Route {
            name: name_of(c),
            filters: c
                .topics
                .iter()
                .map(|t| TopicFilter::parse(t).expect("validated"))
                .collect(),
            destination: Arc::new(Webhook {
                client: client.clone(),
                url: parse_url(&c.url).expect("validated"),
                secret: Arc::from(c.secret.as_bytes()),
                timeout,
            }),
        })
        .collect())
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client(timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(http)
}

/// The most of a receiver's answer body read (and thrown away) so that its connection can
/// be reused; a longer answer costs that connection, nothing else.
const MAX_ANSWER_BODY: usize = 64 * 1024;

/// A webhook: `POST` the event as JSON to `url`, signed with `secret`.
#[derive(Clone)]
pub struct Webhook {
    client: HttpClient,
    url: Uri,
    secret: Arc<[u8]>,
    timeout: Duration,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("Webhook").field("url", &self.url).finish()
    }
}

impl Destination for Webhook {
    fn deliver(&self, event: &OutboxEvent) -> BoxFuture<'static, Result<(), DeliveryError>> {
        let body = webhook_body(event);
        let t = crate::time::unix_now_ms() / 1000;
        let signature = signature_header(&self.secret, t, body.as_bytes());
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(EVENT_ID_HEADER, event.id.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request: the URL was validated, the headers are ASCII");
        let (client, timeout) = (self.client.clone(), self.timeout);
        Box::pin(async move {
            let exchange = async {
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| DeliveryError::Connect(error_chain(&e)))?;
                let status = resp.status();
                // Read the answer so the connection goes back to the pool; a failure here
                // only costs the connection.
                let _ = Limited::new(resp.into_body(), MAX_ANSWER_BODY)
                    .collect()
                    .await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(DeliveryError::Status(status.as_u16()))
                }
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(DeliveryError::Timeout(timeout)),
            }
        })
    }
}

/// An error and its causes on one line (hyper's own `Display` says only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(name: Option<&str>, topics: &[&str], url: &str, secret: &str) -> RouteConfig {
        RouteConfig {
            name: name.map(Into::into),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            url: url.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn good_routes_pass() {
        let routes = [
            rc(
                None,
                &["devices/+/connected"],
                "http://127.0.0.1:9000/hook",
                "s",
            ),
            rc(Some("all"), &["#"], "http://example.com/x", "s"),
            rc(
                Some("b"),
                &["commands/#", "devices/#"],
                "http://[::1]:80/",
                "s",
            ),
        ];
        assert_eq!(validate_routes(&routes), Ok(()));
        let built = routes_from_config(&routes, Duration::from_secs(1)).unwrap();
        assert_eq!(built[0].name, "http://127.0.0.1:9000/hook");
        assert!(built[2].matches("commands/1/completed"));
        assert!(!built[0].matches("devices/1/disconnected"));
    }

    #[test]
    fn bad_routes_are_named() {
        let cases = [
            (
                rc(Some("x"), &["devices/#/a"], "http://h/", "s"),
                "route \"x\": topic filter",
            ),
            (
                rc(None, &[], "http://h/", "s"),
                "route #1 (http://h/): topics",
            ),
            (rc(Some("x"), &["#"], "ftp://h/", "s"), "route \"x\": url"),
            (
                rc(Some("x"), &["#"], "https://h/", "s"),
                "https is not supported",
            ),
            (rc(Some("x"), &["#"], "not a url", "s"), "route \"x\": url"),
            (rc(Some("x"), &["#"], "/path/only", "s"), "route \"x\": url"),
            (
                rc(Some("x"), &["#"], "http://h/", ""),
                "route \"x\": secret",
            ),
            (
                rc(Some(" "), &["#"], "http://h/", "s"),
                "name must not be empty",
            ),
        ];
        for (c, want) in cases {
            let e = validate_routes(&[c]).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let twice = [
            rc(None, &["#"], "http://h/", "s"),
            rc(None, &["devices/#"], "http://h/", "s"),
        ];
        let e = validate_routes(&twice).unwrap_err().to_string();
        assert!(
            e.contains("#2 (http://h/)") && e.contains("same name"),
            "{e}"
        );
    }

    #[test]
    fn the_body_is_exact() {
        let e = OutboxEvent {
            tx: 700,
            id: 42,
            topic: "devices/356307042441013/connected".into(),
            imei: 356_307_042_441_013,
            at_ms: 1_560_161_086_000,
            data: r#"{"imei":"356307042441013","shard":1}"#.into(),
        };
        assert_eq!(
            webhook_body(&e),
            r#"{"id":"42","topic":"devices/356307042441013/connected","time":"2019-06-10T10:04:46.000Z","data":{"imei":"356307042441013","shard":1}}"#
        );
    }
}
