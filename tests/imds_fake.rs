//! A fake EC2 instance metadata service on 127.0.0.1 that behaves like EC2's IMDSv2: a token
//! from PUT /latest/api/token only with the TTL header (400 without), user data only with a
//! valid token (401 without or with a stale one), and modes for 403, 404, 503 and slowness.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Serves the user data.
    Normal,
    /// The first token handed out is stale by the time it is used: 401 once.
    StaleTokenOnce,
    /// IMDS disabled: 403 on everything.
    Disabled,
    /// No user data: 404.
    NoUserData,
    /// 503 with Retry-After: 1 this many times, then normal.
    Unavailable(usize),
    /// Never answers in time.
    Slow,
    /// Every token is refused: 401 on every GET, as when tokens are checked against a clock
    /// that disagrees.
    Unauthorized,
    /// Hands out empty tokens.
    EmptyToken,
    /// The token PUT never answers in time, GETs do: EC2 with a hop limit of 1 seen from a
    /// container, whose PUT responses die on the way.
    SlowToken,
}

pub struct FakeImds {
    pub url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

struct State {
    mode: Mode,
    user_data: Vec<u8>,
    tokens: AtomicUsize,
    unavailable: AtomicUsize,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeImds {
    pub fn start(mode: Mode, user_data: &[u8]) -> FakeImds {
        FakeImds::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), mode, user_data)
    }

    /// Serve on a socket the caller bound (the booted tests bind one at EC2's own address
    /// inside a node's network namespace).
    pub fn start_on(listener: TcpListener, mode: Mode, user_data: &[u8]) -> FakeImds {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            mode,
            user_data: user_data.to_vec(),
            tokens: AtomicUsize::new(0),
            unavailable: AtomicUsize::new(0),
            requests: requests.clone(),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let state = state.clone();
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        FakeImds { url, requests }
    }

    pub fn log(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

fn serve(mut conn: TcpStream, state: &State) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.trim().split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            if k == "content-length" {
                length = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    state
        .requests
        .lock()
        .unwrap()
        .push(format!("{method} {path}"));

    if state.mode == Mode::Slow {
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    if state.mode == Mode::Disabled {
        return respond(&mut conn, "403 Forbidden", &[], b"");
    }
    if let Mode::Unavailable(n) = state.mode
        && state.unavailable.fetch_add(1, Ordering::SeqCst) < n
    {
        return respond(
            &mut conn,
            "503 Service Unavailable",
            &[("Retry-After", "1".into())],
            b"",
        );
    }
    match (method, path) {
        ("PUT", "/latest/api/token") if state.mode == Mode::SlowToken => {
            std::thread::sleep(Duration::from_secs(30));
        }
        ("PUT", "/latest/api/token") if state.mode == Mode::EmptyToken => {
            respond(&mut conn, "200 OK", &[], b"")
        }
        ("PUT", "/latest/api/token") => {
            let Some(ttl) = header("x-aws-ec2-metadata-token-ttl-seconds") else {
                return respond(&mut conn, "400 Bad Request", &[], b"missing TTL");
            };
            let n = state.tokens.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut conn,
                "200 OK",
                &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
                format!("token-{n}").as_bytes(),
            )
        }
        ("GET", "/latest/user-data") => {
            let issued = state.tokens.load(Ordering::SeqCst);
            let valid = match header("x-aws-ec2-metadata-token") {
                // StaleTokenOnce: the first token has expired by the time it is used.
                Some(t) if state.mode == Mode::StaleTokenOnce && t == "token-0" => false,
                Some(t) => t
                    .strip_prefix("token-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n < issued),
                None => false,
            };
            if !valid || state.mode == Mode::Unauthorized {
                return respond(&mut conn, "401 Unauthorized", &[], b"");
            }
            if state.mode == Mode::NoUserData {
                return respond(&mut conn, "404 Not Found", &[], b"");
            }
            respond(&mut conn, "200 OK", &[], &state.user_data)
        }
        // IMDSv2 required, as on current instance types: no token, no metadata.
        ("GET", p) if p.starts_with("/latest/meta-data") => {
            match header("x-aws-ec2-metadata-token") {
                Some(_) => respond(&mut conn, "200 OK", &[], b"ami-id\ninstance-id\n"),
                None => respond(&mut conn, "401 Unauthorized", &[], b""),
            }
        }
        _ => respond(&mut conn, "404 Not Found", &[], b""),
    }
}
