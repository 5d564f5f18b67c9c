//! Reliability-test helpers (`hostile`, `security`, `chaos`): a seeded generator of hostile
//! strings, a recording fake PostgreSQL, and an open-descriptor count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The seed of a property test: `HOSTILE_SEED` when set (to replay a failure), else random. Printed
/// so that a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: seed {seed} (replay with HOSTILE_SEED={seed})");
    seed
}

/// How many cases a property test runs: `HOSTILE_CASES` when set, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Characters that break parsers: controls, separators, quoting, Unicode look-alikes, digits of
/// other scripts, direction overrides, zero-width characters, emoji.
pub const NASTY: &[char] = &[
    '\0',
    '\n',
    '\r',
    '\t',
    '\u{7}',
    '\u{8}',
    '\u{b}',
    '\u{c}',
    '\u{1b}',
    '\u{7f}',
    ' ',
    '"',
    '\'',
    '\\',
    '`',
    '$',
    '%',
    '@',
    ':',
    '/',
    '?',
    '#',
    '[',
    ']',
    '=',
    '&',
    ';',
    ',',
    '*',
    '!',
    '|',
    '~',
    '-',
    '+',
    '.',
    '_',
    '{',
    '}',
    '<',
    '>',
    '\u{85}',
    '\u{a0}',
    '\u{ad}',
    '\u{200b}',
    '\u{200d}',
    '\u{202e}',
    '\u{2028}',
    '\u{feff}',
    '\u{fffd}',
    'é',
    'ß',
    'İ',
    'ı',
    'K',
    '中',
    '٣',
    '१',
    '１',
    '５',
    '𝟗',
    '🦀',
    '\u{10ffff}',
    '\u{e000}',
];

/// Seeded generator of hostile strings.
pub struct Gen {
    pub rng: fastrand::Rng,
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.usize(..items.len())]
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.f64() < p
    }

    /// One character from a random class: ASCII, control, nasty, any Unicode scalar.
    pub fn char(&mut self) -> char {
        match self.rng.u8(..10) {
            0..=3 => self.rng.char(' '..='~'),
            4 => self.rng.char('\0'..='\u{1f}'),
            5..=7 => *self.pick(NASTY),
            8 => self.rng.char('0'..='9'),
            _ => self.rng.char(..),
        }
    }

    /// A random string of up to `max` characters.
    pub fn string(&mut self, max: usize) -> String {
        let len = self.rng.usize(..=max);
        (0..len).map(|_| self.char()).collect()
    }

    /// A random alphanumeric token of exactly `len` characters.
    pub fn token(&mut self, len: usize) -> String {
        (0..len).map(|_| self.rng.alphanumeric()).collect()
    }

    /// One random edit of `s`: insert, delete, replace, duplicate a slice, truncate, pad, case.
    pub fn mutate(&mut self, s: &str) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        match self.rng.u8(..9) {
            0 => {
                let at = self.rng.usize(..=chars.len());
                chars.insert(at, self.char());
            }
            1 if !chars.is_empty() => {
                chars.remove(self.rng.usize(..chars.len()));
            }
            2 if !chars.is_empty() => {
                let at = self.rng.usize(..chars.len());
                chars[at] = self.char();
            }
            3 if !chars.is_empty() => {
                let a = self.rng.usize(..chars.len());
                let b = self.rng.usize(a..=chars.len());
                let slice: Vec<char> = chars[a..b].to_vec();
                let at = self.rng.usize(..=chars.len());
                chars.splice(at..at, slice);
            }
            4 if !chars.is_empty() => chars.truncate(self.rng.usize(..chars.len())),
            5 => {
                let pad = *self.pick(&[" ", "\t", "\n", "\0", "\u{a0}", "\u{feff}", "\r\n"]);
                let mut out = String::new();
                if self.chance(0.5) {
                    out.push_str(pad);
                }
                out.extend(chars.iter());
                if self.chance(0.5) {
                    out.push_str(pad);
                }
                return out;
            }
            6 => return s.to_uppercase(),
            7 => {
                let at = self.rng.usize(..=chars.len());
                let junk = self.string(8);
                chars.splice(at..at, junk.chars());
            }
            _ => {
                let at = self.rng.usize(..=chars.len());
                let c = *self.pick(NASTY);
                chars.insert(at, c);
            }
        }
        chars.into_iter().collect()
    }

    /// `n` rounds of [`mutate`](Self::mutate).
    pub fn mutate_n(&mut self, s: &str, n: usize) -> String {
        let mut out = s.to_owned();
        for _ in 0..n {
            out = self.mutate(&out);
        }
        out
    }

    /// A hostile value for a variable whose good value is `good`.
    pub fn value_for(&mut self, good: &str) -> String {
        const EDGES: &[&str] = &[
            "",
            " ",
            "\t",
            "0",
            "-0",
            "-1",
            "+1",
            "1.5",
            "1e3",
            "0x10",
            "0o7",
            "0b1",
            "007",
            "1_000",
            "1,000",
            "65535",
            "65536",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999999",
            "-9223372036854775808",
            "NaN",
            "inf",
            "-inf",
            "true",
            "false",
            "yes",
            "on",
            "TRUE",
            "unix",
            "UNIX",
            "strict",
            "accept-new",
            "insecure-accept-any",
            "development",
            "production",
            "5ms",
            "5s",
            "1m",
            "٣",
            "１２",
            "५",
            "\u{0}5",
            "5\u{0}",
            "5\n6",
            "null",
            "undefined",
            "None",
            "~",
            "~/",
            "~root/x",
            "/",
            "//",
            ".",
            "..",
            "/dev/null",
            "/proc/self/mem",
            "$HOME",
            "${HOME}",
            "%s%s%s%n",
            "'; DROP TABLE x; --",
            "\u{202e}gnp.exe",
            "SHA256:",
            "sha256:x",
            "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
            "postgres://",
            "postgres://@",
            "://",
        ];
        match self.rng.u8(..12) {
            0..=2 => (*self.pick(EDGES)).to_owned(),
            3..=5 => {
                let n = self.rng.usize(1..4);
                self.mutate_n(good, n)
            }
            6 | 7 => self.string(40),
            8 => {
                // Huge: a repeated unit, sometimes after the good value.
                let unit = if self.chance(0.5) {
                    self.string(4)
                } else {
                    "9".to_owned()
                };
                let unit = if unit.is_empty() { "x".to_owned() } else { unit };
                let n = self.rng.usize(1_000..50_000);
                let mut v = if self.chance(0.3) {
                    good.to_owned()
                } else {
                    String::new()
                };
                v.push_str(&unit.repeat(n));
                v
            }
            9 => format!("{}{}", good, self.pick(NASTY)),
            10 => good.to_owned(),
            _ => {
                let edge = *self.pick(EDGES);
                self.mutate(edge)
            }
        }
    }
}

/// Whether `s` holds a raw control character (a log-injection hazard when printed).
pub fn has_raw_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// A short, escaped preview of a hostile value for assertion messages.
pub fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(80).collect();
    if p.len() < s.len() {
        p.push_str(&format!("... ({} bytes)", s.len()));
    }
    format!("{p:?}")
}

// ---------------------------------------------------------------------------------------------
// A recording fake PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A loopback TCP server that plays the first steps of the PostgreSQL protocol and records every
/// byte a client sends: it reads the startup message (answering an SSLRequest with `N`), asks for
/// a cleartext password, records the password message, then fails authentication.
///
/// So a client that reaches it sends its password in clear, and the test can see whether (and
/// when) that happened.
pub struct RecordingPostgres {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl RecordingPostgres {
    pub async fn start() -> RecordingPostgres {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the recorder");
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (rx, conns, token, t) = (received.clone(), connections.clone(), cancel.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let rx = rx.clone();
                let token = token.clone();
                t.spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = serve_fake(stream, rx) => {}
                    }
                });
            }
        });
        RecordingPostgres {
            addr,
            received,
            connections,
            cancel,
            tracker,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every byte received so far, from all connections.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn serve_fake(mut stream: tokio::net::TcpStream, received: Arc<Mutex<Vec<u8>>>) {
    async fn read_message(
        stream: &mut tokio::net::TcpStream,
        received: &Mutex<Vec<u8>>,
        typed: bool,
    ) -> Option<Vec<u8>> {
        let mut head = vec![0u8; if typed { 5 } else { 4 }];
        stream.read_exact(&mut head).await.ok()?;
        let len_at = usize::from(typed);
        let len = u32::from_be_bytes(head[len_at..len_at + 4].try_into().unwrap()) as usize;
        if !(4..=1 << 20).contains(&len) {
            received.lock().unwrap().extend_from_slice(&head);
            return None;
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.ok()?;
        let mut all = head;
        all.extend_from_slice(&body);
        received.lock().unwrap().extend_from_slice(&all);
        Some(all)
    }
    // Startup (maybe preceded by SSLRequest / GSSENCRequest, answered with 'N').
    for _ in 0..3 {
        let Some(msg) = read_message(&mut stream, &received, false).await else {
            return;
        };
        let code = u32::from_be_bytes(msg[4..8].try_into().unwrap_or([0; 4]));
        if msg.len() == 8 && (code == 80877103 || code == 80877104) {
            if stream.write_all(b"N").await.is_err() {
                return;
            }
            continue;
        }
        break;
    }
    // AuthenticationCleartextPassword.
    if stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await.is_err() {
        return;
    }
    let _ = read_message(&mut stream, &received, true).await;
    // ErrorResponse: 28P01 invalid_password, then close.
    let mut fields = Vec::new();
    for (t, v) in [
        (b'S', "FATAL"),
        (b'C', "28P01"),
        (b'M', "password authentication failed"),
    ] {
        fields.push(t);
        fields.extend_from_slice(v.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&fields);
    let _ = stream.write_all(&msg).await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Process counters
// ---------------------------------------------------------------------------------------------

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}
