//! The admin/command HTTP API (hyper, HTTP/1.1) on `api_addr`. Runs on the control thread.
//!
//! One table, [`ROUTES`], says which method and path reach which endpoint and what scope it
//! needs; the router reads it, and a test holds the OpenAPI document to it. A request is routed
//! (404, 405), then its key checked (401, 403), then handled; every answer but `/metrics` is
//! JSON, errors `{"error": "..."}`. Bodies are read with a bound ([`MAX_BODY`], 413 past it).

pub mod auth;
pub mod handlers;
pub mod types;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc::UnboundedSender;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::watch;
use utoipa::OpenApi;

use crate::control::commands::Commands;
use crate::control::metrics::Gauges;
use crate::log_every::LogEvery;
use crate::shard::ShardMsg;

use auth::{ApiKeys, Scope};

/// Largest request body read (a command is at most 4 KiB of payload; JSON around it is small).
pub const MAX_BODY: usize = 64 * 1024;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request head within this (a silent socket costs a slot otherwise).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// At stop, how long requests in progress may take to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// At most one line this often for what can repeat at request speed (refused keys, failed
/// accepts); the counters in the metrics have every one.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What the handlers share.
pub struct Api {
    pub keys: ApiKeys,
    pub cmds: Arc<Commands>,
    /// The control thread's database pool (the ledger's too): `/readyz`, last sessions.
    pub pool: deadpool_postgres::Pool,
    pub inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
    pub gauges: Arc<Gauges>,
    pub registry: prometheus_client::registry::Registry,
    /// The OpenAPI document, rendered once.
    pub openapi: Bytes,
    /// Paces the "API request refused" warning (each refusal is counted by reason).
    refused_log: LogEvery,
}

impl Api {
    pub fn new(
        keys: ApiKeys,
        cmds: Arc<Commands>,
        pool: deadpool_postgres::Pool,
        inboxes: Arc<Vec<UnboundedSender<ShardMsg>>>,
        gauges: Arc<Gauges>,
    ) -> Api {
        let openapi = types::ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes");
        Api {
            keys,
            cmds,
            pool,
            inboxes,
            registry: crate::control::metrics::registry(gauges.clone()),
            gauges,
            openapi: Bytes::from(openapi),
            refused_log: LogEvery::new(LOG_EVERY),
        }
    }
}

// ===== replies =====

/// A response under construction.
pub struct Reply(Response<Full<Bytes>>);

impl Reply {
    pub fn new(status: StatusCode) -> Reply {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = status;
        Reply(r)
    }

    pub fn content_type(mut self, ct: &'static str) -> Reply {
        self.0
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.0.headers_mut().insert(name, v);
        }
        self
    }

    pub fn body(mut self, b: Bytes) -> Reply {
        *self.0.body_mut() = Full::new(b);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.0.status()
    }
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, v: &T) -> Reply {
    match serde_json::to_vec(v) {
        Ok(b) => Reply::new(status)
            .content_type("application/json")
            .body(Bytes::from(b)),
        Err(e) => {
            tracing::error!(error = %e, "Serializing an API answer failed.");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "serializing the answer failed",
            )
        }
    }
}

/// `{"error": what}`.
pub fn error(status: StatusCode, what: &str) -> Reply {
    json(
        status,
        &types::ErrorBody {
            error: what.to_string(),
        },
    )
}

// ===== routes =====

/// The endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    ListDevices,
    GetDevice,
    DeviceCommands,
    Stats,
    PostCommand,
    GetCommand,
    CancelCommand,
}

/// One route: method, path (`{name}` matches one segment), endpoint, the scope it needs
/// (`None`: open, for probes and scrapers).
pub type Route = (&'static str, &'static str, Endpoint, Option<Scope>);

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    ("GET", "/healthz", Endpoint::Healthz, None),
    ("GET", "/readyz", Endpoint::Readyz, None),
    ("GET", "/metrics", Endpoint::Metrics, None),
    (
        "GET",
        "/api/v1/openapi.json",
        Endpoint::OpenApi,
        Some(Scope::Read),
    ),
    (
        "GET",
        "/api/v1/devices",
        Endpoint::ListDevices,
        Some(Scope::Read),
    ),
    (
        "GET",
        "/api/v1/devices/{imei}",
        Endpoint::GetDevice,
        Some(Scope::Read),
    ),
    (
        "GET",
        "/api/v1/devices/{imei}/commands",
        Endpoint::DeviceCommands,
        Some(Scope::Read),
    ),
    ("GET", "/api/v1/stats", Endpoint::Stats, Some(Scope::Read)),
    (
        "POST",
        "/api/v1/commands",
        Endpoint::PostCommand,
        Some(Scope::Command),
    ),
    (
        "GET",
        "/api/v1/commands/{id}",
        Endpoint::GetCommand,
        Some(Scope::Read),
    ),
    (
        "DELETE",
        "/api/v1/commands/{id}",
        Endpoint::CancelCommand,
        Some(Scope::Command),
    ),
];

/// The path parameters of `path` if it matches `pattern`.
fn matches<'p>(pattern: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut params = Vec::new();
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(g)) if p.starts_with('{') && !g.is_empty() => params.push(g),
            (Some(p), Some(g)) if p == g => {}
            _ => return None,
        }
    }
}

/// What routing a request found.
#[derive(Debug, PartialEq)]
pub enum Routed<'p> {
    Found(&'static Route, Vec<&'p str>),
    /// The path exists, not with this method: the methods it has.
    WrongMethod(Vec<&'static str>),
    NotFound,
}

pub fn route<'p>(method: &str, path: &'p str) -> Routed<'p> {
    let mut allowed = Vec::new();
    for r in ROUTES {
        if let Some(params) = matches(r.1, path) {
            if r.0 == method {
                return Routed::Found(r, params);
            }
            allowed.push(r.0);
        }
    }
    if allowed.is_empty() {
        Routed::NotFound
    } else {
        Routed::WrongMethod(allowed)
    }
}

// ===== requests =====

/// Answers one request.
pub async fn handle(api: &Api, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let reply = dispatch(api, peer, req).await;
    tracing::debug!(%peer, %method, %path, status = reply.status().as_u16(), "API request.");
    reply.0
}

async fn dispatch(api: &Api, peer: SocketAddr, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let (r, params) = match route(req.method().as_str(), &path) {
        Routed::Found(r, p) => (r, p.into_iter().map(str::to_string).collect::<Vec<_>>()),
        Routed::WrongMethod(allowed) => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "{} is not allowed on {path}; use {}",
                    req.method(),
                    allowed.join(", ")
                ),
            )
            .header("allow", &allowed.join(", "))
        }
        Routed::NotFound => return error(StatusCode::NOT_FOUND, &format!("no endpoint {path}")),
    };
    let (_, _, endpoint, needed) = *r;
    if let Some(needed) = needed {
        if let Err(d) = api.keys.check(req.headers(), needed) {
            api.gauges.api.denied(d);
            // Never the key itself. A client guessing keys (or a misconfigured one polling)
            // would write a line per request: one per period, with the count held back;
            // `fleetgate_api_auth_failures_total{reason}` counts every one.
            if let Some(held_back) = api.refused_log.ready() {
                tracing::warn!(%peer, method = %req.method(), %path, reason = d.name(), refused_since_last_line = held_back + 1, "API request refused.");
            }
            return match d {
                auth::Denied::Missing => error(
                    StatusCode::UNAUTHORIZED,
                    "an API key is required (x-api-key or Authorization: Bearer)",
                ),
                auth::Denied::Wrong => error(StatusCode::UNAUTHORIZED, "the API key is not valid"),
                auth::Denied::Scope => error(
                    StatusCode::FORBIDDEN,
                    &format!("the API key lacks the `{}` scope", needed.name()),
                ),
            }
            .header("www-authenticate", "Bearer");
        }
    }
    let query = req.uri().query().unwrap_or("").to_string();
    macro_rules! query {
        ($t:ty) => {
            match serde_urlencoded::from_str::<$t>(&query) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad query: {e}")),
            }
        };
    }
    match endpoint {
        Endpoint::Healthz => handlers::healthz().await,
        Endpoint::Readyz => handlers::readyz(api).await,
        Endpoint::Metrics => handlers::metrics(api).await,
        Endpoint::OpenApi => handlers::openapi(api).await,
        Endpoint::ListDevices => handlers::list_devices(api, query!(types::DevicesQuery)).await,
        Endpoint::GetDevice => handlers::get_device(api, &params[0]).await,
        Endpoint::DeviceCommands => {
            handlers::device_commands(api, &params[0], query!(types::DeviceCommandsQuery)).await
        }
        Endpoint::Stats => handlers::stats(api).await,
        Endpoint::PostCommand => match read_body(req).await {
            Ok(body) => handlers::post_command(api, &body).await,
            Err(r) => r,
        },
        Endpoint::GetCommand => handlers::get_command(api, &params[0]).await,
        Endpoint::CancelCommand => handlers::cancel_command(api, &params[0]).await,
    }
}

/// The request body, at most [`MAX_BODY`] bytes (refused by its declared length before any
/// of it is read, or once that many bytes came).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("reading the body failed: {e}"),
        )),
    }
}

// ===== the server =====

/// Serves the API on `listener` until `stop` turns true (or its sender goes); then stops
/// accepting and gives requests in progress [`STOP_GRACE`] to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let accept_failed = LogEvery::new(LOG_EVERY);
    loop {
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            s = slots.clone().acquire_owned() => s.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: counted, logged once per period (not
                    // every 100 ms while it lasts), and a pause rather than a spin.
                    api.gauges.api.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(held_back) = accept_failed.ready() {
                        tracing::warn!(error = %e, failures = held_back + 1, "Accepting an API connection failed (out of descriptors? see tuning/kernel-limits.md).");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        let service = hyper::service::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(handle(&api, peer, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "API connection ended with an error.");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API requests still in progress at stop were cut off.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_paths_and_methods() {
        let found = |m, p| match route(m, p) {
            Routed::Found(r, params) => Some((r.2, params)),
            _ => None,
        };
        assert_eq!(
            found("GET", "/api/v1/devices/356307042441013"),
            Some((Endpoint::GetDevice, vec!["356307042441013"]))
        );
        assert_eq!(
            found("GET", "/api/v1/devices/1/commands"),
            Some((Endpoint::DeviceCommands, vec!["1"]))
        );
        assert_eq!(
            found("DELETE", "/api/v1/commands/5"),
            Some((Endpoint::CancelCommand, vec!["5"]))
        );
        assert_eq!(
            route("PUT", "/api/v1/commands/5"),
            Routed::WrongMethod(vec!["GET", "DELETE"])
        );
        assert_eq!(route("GET", "/api/v1/devices/"), Routed::NotFound);
        assert_eq!(route("GET", "/api/v1/device"), Routed::NotFound);
        assert_eq!(
            route("GET", "/api/v1/devices/1/commands/2"),
            Routed::NotFound
        );
    }

    /// The document lists exactly the routes the router serves, and says which need a key.
    #[test]
    fn the_openapi_document_is_the_route_table() {
        let doc = serde_json::to_value(types::ApiDoc::openapi()).unwrap();
        let mut documented: Vec<(String, String, bool)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let secured = op.get("security").is_some();
                documented.push((method.to_uppercase(), path.clone(), secured));
            }
        }
        let mut served: Vec<(String, String, bool)> = ROUTES
            .iter()
            .map(|r| (r.0.to_string(), r.1.to_string(), r.3.is_some()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
