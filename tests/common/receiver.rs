//! A real webhook receiver: an HTTP/1.1 server on 127.0.0.1 (std::net, a thread per
//! connection, keep-alive) that records every request and answers with the status it is told.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The body's `id`.
    pub fn id(&self) -> String {
        self.json()["id"]
            .as_str()
            .expect("id is a string")
            .to_string()
    }
}

struct State {
    received: Mutex<Vec<Received>>,
    status: AtomicU16,
    stop: AtomicBool,
}

/// A running receiver; stops (closing its listener and every connection) on drop.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Receiver {
    /// On any free port, answering `status`.
    pub fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("binding the receiver: {e}"));
        Receiver::serve_on(listener, status)
    }

    /// On `listener`, answering `status`.
    fn serve_on(listener: TcpListener, status: u16) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            received: Mutex::new(Vec::new()),
            status: AtomicU16::new(status),
            stop: AtomicBool::new(false),
        });
        let threads = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (state, threads) = (state.clone(), threads.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if state.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let t = std::thread::spawn(move || serve(conn, &state));
                    threads.lock().unwrap().push(t);
                }
            })
        };
        Receiver {
            addr,
            state,
            threads,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer every request from now on with `status`.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::Release);
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests answered 2xx (deliveries), in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Stops: the port refuses connections afterwards, open connections are closed.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            // Wake the blocking accept.
            let _ = TcpStream::connect(self.addr);
            let _ = a.join();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A port of 127.0.0.1 kept for a receiver that starts later: bound but not listening, so
/// that connections to it are refused until then, and held, so that nothing else can take it
/// meanwhile (the port of a listener bound to port 0 and closed is free for any socket of
/// any process to take before it is bound again).
pub struct ReservedPort {
    socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket
            .bind(&any.into())
            .unwrap_or_else(|e| panic!("reserving a port: {e}"));
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        ReservedPort { socket, addr }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A receiver on the port, answering `status`.
    pub fn start(self, status: u16) -> Receiver {
        self.socket
            .listen(128)
            .unwrap_or_else(|e| panic!("listening on {}: {e}", self.addr));
        Receiver::serve_on(self.socket.into(), status)
    }
}

/// Serves one connection until the peer closes it or the receiver stops.
fn serve(conn: TcpStream, state: &State) {
    // Short read timeouts so the thread sees a stop.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let Some(req) = read_request(&mut reader, state) else {
            return;
        };
        let status = state.status.load(Ordering::Acquire);
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
        state
            .received
            .lock()
            .unwrap()
            .push(Received { status, ..req });
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads a line, riding out read timeouts until the receiver stops; `None` at EOF or stop.
fn read_line(reader: &mut BufReader<TcpStream>, state: &State) -> Option<String> {
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => return Some(line),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if state.stop.load(Ordering::Acquire) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>, state: &State) -> Option<Received> {
    let start = read_line(reader, state)?;
    let mut parts = start.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let line = read_line(reader, state)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    let mut got = 0;
    while got < len {
        match reader.read(&mut body[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if state.stop.load(Ordering::Acquire) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    Some(Received {
        method,
        path,
        headers,
        body: String::from_utf8(body).expect("a UTF-8 body"),
        status: 0,
    })
}
