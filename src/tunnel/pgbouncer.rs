//! PgBouncer (transaction pooling) compatibility for one forwarded connection: named prepared
//! statements become the unnamed statement, re-parsed on whatever server connection the pooler
//! lends next.
//!
//! sqlx prepares every SeaORM statement under a name (`sqlx_s_N`) with Parse + Describe + Sync,
//! then runs it with Bind + Execute + Sync, and later runs the cached name again with Bind alone.
//! A transaction pooler without prepared-statement support (PgBouncer before 1.21) hands the
//! client another server connection after each `ReadyForQuery` outside a transaction, where that
//! name does not exist (`26000`) or already exists (`42P05`). This rewriter keeps the names on
//! our side:
//!
//! - `Parse(name, query)` is remembered and sent as `Parse("", query)`;
//! - `Bind` / `Describe` of a remembered name that is not the server's current unnamed statement
//!   are preceded by `Parse("", query)`, whose `ParseComplete` is swallowed; the name becomes `""`;
//! - `Close` of a remembered name is answered locally (`CloseComplete`) at the place the server
//!   would have answered it;
//! - after `ReadyForQuery` with status idle (the pooler may switch servers now) and after a simple
//!   `Query` (which drops the unnamed statement) nothing is assumed about the server's unnamed
//!   statement.
//!
//! Everything else passes byte for byte. The server's replies are matched to the client's
//! messages in order (PostgreSQL answers them in order), and after an `ErrorResponse` in the
//! extended protocol the server skips everything up to the next `Sync`, and so does the rewriter
//! for its own injected and local replies. Nothing is buffered beyond one message.

use std::collections::{HashMap, VecDeque};

/// The largest message accepted from either side (PostgreSQL's own limit for most messages is
/// 1 GiB; a `Bind` with big parameters may be large).
pub(crate) const MAX_MESSAGE: usize = 1 << 30;

/// What the server's replies to one message (or one local reply) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A client message whose replies pass; `end` is the tag that completes it.
    Pass(Ends),
    /// A `Parse("", ..)` we injected: its `ParseComplete` is not the client's.
    Swallow,
    /// A `CloseComplete` owed to the client for a `Close` answered locally.
    LocalCloseComplete,
    /// `Sync`: completed by `ReadyForQuery`.
    Sync,
    /// A simple `Query` (or `FunctionCall`): everything up to `ReadyForQuery`, errors included.
    Simple,
}

/// The reply tags that complete an extended-protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    ParseComplete,
    BindComplete,
    /// `Describe` of a statement: `ParameterDescription`, then `RowDescription` or `NoData`.
    DescribeStatement,
    /// `Describe` of a portal: `RowDescription` or `NoData`.
    DescribePortal,
    /// `Execute`: `CommandComplete`, `EmptyQueryResponse` or `PortalSuspended`.
    Execute,
    CloseComplete,
}

impl Ends {
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Ends::ParseComplete => tag == b'1',
            Ends::BindComplete => tag == b'2',
            Ends::DescribeStatement | Ends::DescribePortal => matches!(tag, b'T' | b'n'),
            Ends::Execute => matches!(tag, b'C' | b'I' | b's'),
            Ends::CloseComplete => tag == b'3',
        }
    }
}

/// A remembered statement: the `Parse` body after its name (query, parameter types).
type Statement = Vec<u8>;

/// The rewriter of one client connection. Feed it whole messages (tag + length + body).
#[derive(Debug, Default)]
pub(crate) struct Rewriter {
    statements: HashMap<Vec<u8>, Statement>,
    /// The client's name of the statement that is the server's unnamed one now, if known.
    server_unnamed: Option<Vec<u8>>,
    pending: VecDeque<Entry>,
    /// After an extended-protocol error: skip entries up to the next `Sync`.
    skipping: bool,
    /// Statements re-parsed for a `Bind` / `Describe` (a measure of the cost of the mode).
    pub(crate) reparsed: u64,
}

/// Splits the first complete message off `buf`: `Some((tag, whole message length))`.
/// `Err` when a length is impossible (below 4 or above [`MAX_MESSAGE`]).
pub(crate) fn next_message(buf: &[u8]) -> Result<Option<(u8, usize)>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(format!(
            "a PostgreSQL message of type {:?} claims {len} bytes",
            char::from(buf[0])
        ));
    }
    Ok((buf.len() > len).then_some((buf[0], len + 1)))
}

/// Appends the message `tag` whose body is `parts` concatenated (no intermediate buffer: this
/// runs for every rewritten message).
fn put_message(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(len + 5);
    out.push(tag);
    out.extend_from_slice(&u32::try_from(len + 4).unwrap_or(u32::MAX).to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_message(&mut out, tag, &[body]);
    out
}

/// The NUL-terminated string at the start of `body`, and the rest after its NUL.
fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    Some((&body[..nul], &body[nul + 1..]))
}

impl Rewriter {
    pub(crate) fn new() -> Rewriter {
        Rewriter::default()
    }

    /// One client message (`msg` = tag, length, body): appends what goes to the server to
    /// `to_server` and any local reply to `to_client`.
    pub(crate) fn client_message(&mut self, msg: &[u8], to_server: &mut Vec<u8>, to_client: &mut Vec<u8>) {
        let tag = msg[0];
        let body = &msg[5..];
        match tag {
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    return self.pass(msg, None, to_server);
                };
                if name.is_empty() {
                    self.server_unnamed = Some(Vec::new());
                    return self.pass(msg, Some(Entry::Pass(Ends::ParseComplete)), to_server);
                }
                self.statements.insert(name.to_vec(), rest.to_vec());
                self.send_parse(name, rest, Entry::Pass(Ends::ParseComplete), to_server);
            }
            b'B' => {
                let Some((portal, rest)) = cstr(body) else {
                    return self.pass(msg, None, to_server);
                };
                let Some((name, rest)) = cstr(rest) else {
                    return self.pass(msg, None, to_server);
                };
                if name.is_empty() || !self.statements.contains_key(name) {
                    return self.pass(msg, Some(Entry::Pass(Ends::BindComplete)), to_server);
                }
                self.ensure_unnamed(name, to_server);
                // Same portal, statement "" (two NULs), the rest as it came.
                put_message(to_server, b'B', &[portal, b"\0\0", rest]);
                self.pending.push_back(Entry::Pass(Ends::BindComplete));
            }
            b'D' => {
                let kind = body.first().copied();
                let name = body.get(1..).and_then(cstr).map(|(n, _)| n);
                match (kind, name) {
                    (Some(b'S'), Some(name)) if !name.is_empty() && self.statements.contains_key(name) => {
                        self.ensure_unnamed(name, to_server);
                        put_message(to_server, b'D', &[b"S\0"]);
                        self.pending.push_back(Entry::Pass(Ends::DescribeStatement));
                    }
                    (Some(b'S'), _) => self.pass(msg, Some(Entry::Pass(Ends::DescribeStatement)), to_server),
                    _ => self.pass(msg, Some(Entry::Pass(Ends::DescribePortal)), to_server),
                }
            }
            b'C' => {
                let kind = body.first().copied();
                let name = body.get(1..).and_then(cstr).map(|(n, _)| n.to_vec());
                match (kind, name) {
                    (Some(b'S'), Some(name)) if !name.is_empty() && self.statements.contains_key(&name) => {
                        self.statements.remove(&name);
                        if self.server_unnamed.as_deref() == Some(&name[..]) {
                            self.server_unnamed = None;
                        }
                        self.pending.push_back(Entry::LocalCloseComplete);
                        self.flush_local(to_client);
                    }
                    _ => self.pass(msg, Some(Entry::Pass(Ends::CloseComplete)), to_server),
                }
            }
            b'E' => self.pass(msg, Some(Entry::Pass(Ends::Execute)), to_server),
            b'S' => self.pass(msg, Some(Entry::Sync), to_server),
            b'Q' | b'F' => {
                // A simple query drops the unnamed statement.
                self.server_unnamed = None;
                self.pass(msg, Some(Entry::Simple), to_server);
            }
            // Flush, CopyData/Done/Fail, Terminate, anything else: no reply of its own to track.
            _ => self.pass(msg, None, to_server),
        }
    }

    /// One server message: appends what goes to the client to `to_client`.
    pub(crate) fn server_message(&mut self, msg: &[u8], to_client: &mut Vec<u8>) {
        let tag = msg[0];
        match tag {
            // Asynchronous: notices, parameter changes, notifications, and COPY traffic.
            b'N' | b'S' | b'A' | b'G' | b'H' | b'W' | b'd' | b'c' | b't' | b'D' | b'V' => {
                to_client.extend_from_slice(msg);
                return;
            }
            _ => {}
        }
        if tag == b'E' {
            to_client.extend_from_slice(msg);
            match self.pending.front() {
                // A simple query goes on to its ReadyForQuery.
                Some(Entry::Simple) | None => {}
                Some(_) => {
                    // What failed may have been our own Parse: assume nothing about the unnamed one.
                    self.server_unnamed = None;
                    // The server now skips every message up to the next Sync.
                    while let Some(entry) = self.pending.front() {
                        if *entry == Entry::Sync {
                            break;
                        }
                        self.pending.pop_front();
                    }
                    self.skipping = true;
                }
            }
            return;
        }
        if tag == b'Z' {
            let status = msg.get(5).copied().unwrap_or(b'I');
            // The Sync (or simple query) this answers, and anything the server skipped before it.
            while let Some(entry) = self.pending.pop_front() {
                if matches!(entry, Entry::Sync | Entry::Simple) {
                    break;
                }
            }
            self.skipping = false;
            if status == b'I' {
                // Outside a transaction the pooler may lend another server next.
                self.server_unnamed = None;
            }
            to_client.extend_from_slice(msg);
            self.flush_local(to_client);
            return;
        }
        match self.pending.front().copied() {
            Some(Entry::Swallow) if tag == b'1' => {
                self.pending.pop_front();
            }
            Some(Entry::Pass(ends)) => {
                to_client.extend_from_slice(msg);
                if ends.completed_by(tag) {
                    self.pending.pop_front();
                }
            }
            _ => to_client.extend_from_slice(msg),
        }
        self.flush_local(to_client);
    }

    /// Whether every reply the client waits for has come: nothing pending.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    fn pass(&mut self, msg: &[u8], entry: Option<Entry>, to_server: &mut Vec<u8>) {
        to_server.extend_from_slice(msg);
        if let Some(entry) = entry {
            self.pending.push_back(entry);
        }
    }

    fn send_parse(&mut self, name: &[u8], rest: &[u8], entry: Entry, to_server: &mut Vec<u8>) {
        // `\0`: the unnamed statement.
        put_message(to_server, b'P', &[b"\0", rest]);
        self.pending.push_back(entry);
        self.server_unnamed = Some(name.to_vec());
    }

    /// Makes `name` the server's unnamed statement, parsing it again if it is not.
    fn ensure_unnamed(&mut self, name: &[u8], to_server: &mut Vec<u8>) {
        if self.server_unnamed.as_deref() == Some(name) {
            return;
        }
        let Some(rest) = self.statements.get(name) else {
            return;
        };
        put_message(to_server, b'P', &[b"\0", rest]);
        self.pending.push_back(Entry::Swallow);
        self.server_unnamed = Some(name.to_vec());
        self.reparsed += 1;
    }

    /// Sends the local replies that are due (at the head of the queue).
    fn flush_local(&mut self, to_client: &mut Vec<u8>) {
        while self.pending.front() == Some(&Entry::LocalCloseComplete) {
            self.pending.pop_front();
            if !self.skipping {
                put_message(to_client, b'3', &[]);
            }
        }
    }
}

/// Copies one forwarded connection both ways after its startup, through a [`Rewriter`].
///
/// Two tasks' worth of work in one future: client → server and server → client each read into
/// their own buffer and hand whole messages to the shared rewriter; whatever goes to the local
/// client (server replies and local `CloseComplete`s) is queued in the order the rewriter made
/// it, under its lock, so the two kinds never overtake each other.
pub(crate) async fn copy_rewriting<L, U>(local: L, upstream: U) -> std::io::Result<()>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::io;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const READ: usize = 64 * 1024;
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let rewriter = tokio::sync::Mutex::new(Rewriter::new());
    let (to_local, mut local_queue) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);

    let (client_tx, server_tx) = (to_local.clone(), to_local);
    let client_side = async {
        let to_local = client_tx;
        let mut buf = Vec::with_capacity(READ);
        let mut to_server = Vec::new();
        loop {
            if buf.capacity() - buf.len() < READ / 4 {
                buf.reserve(READ);
            }
            if local_read.read_buf(&mut buf).await? == 0 {
                let _ = up_write.shutdown().await;
                return Ok::<(), io::Error>(());
            }
            let mut used = 0;
            {
                let mut r = rewriter.lock().await;
                let mut to_client = Vec::new();
                while let Some((_, len)) = next_message(&buf[used..]).map_err(bad)? {
                    r.client_message(&buf[used..used + len], &mut to_server, &mut to_client);
                    used += len;
                }
                if !to_client.is_empty() && to_local.send(to_client).await.is_err() {
                    return Ok(());
                }
            }
            buf.drain(..used);
            if !to_server.is_empty() {
                up_write.write_all(&to_server).await?;
                to_server.clear();
            }
        }
    };
    let server_side = async {
        let to_local = server_tx;
        let mut buf = Vec::with_capacity(READ);
        loop {
            if buf.capacity() - buf.len() < READ / 4 {
                buf.reserve(READ);
            }
            if up_read.read_buf(&mut buf).await? == 0 {
                return Ok::<(), io::Error>(());
            }
            let mut used = 0;
            let mut r = rewriter.lock().await;
            let mut to_client = Vec::with_capacity(buf.len());
            while let Some((_, len)) = next_message(&buf[used..]).map_err(bad)? {
                r.server_message(&buf[used..used + len], &mut to_client);
                used += len;
            }
            if !to_client.is_empty() && to_local.send(to_client).await.is_err() {
                return Ok(());
            }
            drop(r);
            buf.drain(..used);
        }
    };
    let writer = async {
        while let Some(bytes) = local_queue.recv().await {
            local_write.write_all(&bytes).await?;
        }
        let _ = local_write.shutdown().await;
        Ok::<(), io::Error>(())
    };
    // The connection is over when either side ends (or fails); what is queued is still written
    // (both senders are dropped with their sides, which ends the writer).
    let sides = async {
        tokio::select! {
            r = client_side => r,
            r = server_side => r,
        }
    };
    let (sides, written) = tokio::join!(sides, writer);
    sides.and(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, query: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(query.as_bytes());
        body.push(0);
        body.extend_from_slice(&0u16.to_be_bytes());
        message(b'P', &body)
    }

    fn bind(portal: &str, name: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(portal.as_bytes());
        body.push(0);
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        message(b'B', &body)
    }

    fn describe_statement(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        message(b'D', &body)
    }

    fn close_statement(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        message(b'C', &body)
    }

    fn execute() -> Vec<u8> {
        message(b'E', &[0, 0, 0, 0, 0])
    }

    fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    fn rfq(status: u8) -> Vec<u8> {
        message(b'Z', &[status])
    }

    /// The messages in `bytes`, as (tag, body) pairs.
    fn split(mut bytes: &[u8]) -> Vec<(char, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((tag, len)) = next_message(bytes).unwrap() {
            out.push((char::from(tag), bytes[5..len].to_vec()));
            bytes = &bytes[len..];
        }
        assert!(bytes.is_empty());
        out
    }

    fn tags(bytes: &[u8]) -> String {
        split(bytes).into_iter().map(|(t, _)| t).collect()
    }

    struct Run {
        r: Rewriter,
        to_server: Vec<u8>,
        to_client: Vec<u8>,
    }

    impl Run {
        fn new() -> Run {
            Run {
                r: Rewriter::new(),
                to_server: Vec::new(),
                to_client: Vec::new(),
            }
        }
        fn client(&mut self, msgs: &[Vec<u8>]) -> Vec<u8> {
            self.to_server.clear();
            for m in msgs {
                self.r.client_message(m, &mut self.to_server, &mut self.to_client);
            }
            std::mem::take(&mut self.to_server)
        }
        fn server(&mut self, msgs: &[Vec<u8>]) -> Vec<u8> {
            for m in msgs {
                self.r.server_message(m, &mut self.to_client);
            }
            std::mem::take(&mut self.to_client)
        }
    }

    #[test]
    fn sqlx_prepare_then_execute_then_cached_reexecution() {
        let mut run = Run::new();
        // Prepare: Parse + Describe + Sync.
        let sent = run.client(&[parse("sqlx_s_1", "SELECT $1"), describe_statement("sqlx_s_1"), sync()]);
        let msgs = split(&sent);
        assert_eq!(tags(&sent), "PDS");
        assert_eq!(msgs[0].1[0], 0, "sent as the unnamed statement");
        assert_eq!(msgs[1].1, b"S\0", "described as the unnamed statement");
        let got = run.server(&[
            message(b'1', b""),
            message(b't', b"\0\0"),
            message(b'n', b""),
            rfq(b'I'),
        ]);
        assert_eq!(tags(&got), "1tnZ");
        // Execute: the pooler may have lent another server: parse again, swallow its ParseComplete.
        let sent = run.client(&[bind("", "sqlx_s_1"), execute(), sync()]);
        assert_eq!(tags(&sent), "PBES");
        assert_eq!(split(&sent)[1].1[..2], [0, 0], "bound to the unnamed statement");
        let got = run.server(&[
            message(b'1', b""),
            message(b'2', b""),
            message(b'D', b"\0\x01\0\0\0\x011"),
            message(b'C', b"SELECT 1\0"),
            rfq(b'I'),
        ]);
        assert_eq!(tags(&got), "2DCZ", "the injected ParseComplete is not the client's");
        assert_eq!(run.r.reparsed, 1);
    }

    #[test]
    fn inside_a_transaction_the_unnamed_statement_is_reused() {
        let mut run = Run::new();
        run.client(&[message(b'Q', b"BEGIN\0")]);
        run.server(&[message(b'C', b"BEGIN\0"), rfq(b'T')]);
        run.client(&[parse("s1", "SELECT 1"), bind("", "s1"), execute(), sync()]);
        run.server(&[
            message(b'1', b""),
            message(b'2', b""),
            message(b'C', b"SELECT 1\0"),
            rfq(b'T'),
        ]);
        // Same server (in a transaction), same unnamed statement: no re-parse.
        let sent = run.client(&[bind("", "s1"), execute(), sync()]);
        assert_eq!(tags(&sent), "BES");
        assert_eq!(run.r.reparsed, 0);
        // Another name in between makes it parse again.
        run.server(&[message(b'2', b""), message(b'C', b"SELECT 1\0"), rfq(b'T')]);
        run.client(&[parse("s2", "SELECT 2"), sync()]);
        run.server(&[message(b'1', b""), rfq(b'T')]);
        let sent = run.client(&[bind("", "s1"), execute(), sync()]);
        assert_eq!(tags(&sent), "PBES");
    }

    #[test]
    fn close_is_answered_locally_in_order() {
        let mut run = Run::new();
        run.client(&[parse("s1", "SELECT 1"), sync()]);
        run.server(&[message(b'1', b""), rfq(b'I')]);
        // Close of a statement the server never saw under that name: not sent, answered in place.
        let sent = run.client(&[close_statement("s1"), sync()]);
        assert_eq!(tags(&sent), "S");
        let got = run.server(&[rfq(b'I')]);
        assert_eq!(tags(&got), "3Z", "CloseComplete before ReadyForQuery");
        // Behind a pending reply it waits its turn.
        run.client(&[parse("s2", "SELECT 2")]);
        let sent = run.client(&[close_statement("s2"), sync()]);
        assert_eq!(tags(&sent), "S");
        let got = run.server(&[message(b'1', b""), rfq(b'I')]);
        assert_eq!(tags(&got), "13Z");
        // A name we do not know is the server's business.
        let sent = run.client(&[close_statement("unknown"), sync()]);
        assert_eq!(tags(&sent), "CS");
    }

    #[test]
    fn after_an_error_the_rest_up_to_sync_is_skipped_like_the_server_does() {
        let mut run = Run::new();
        run.client(&[parse("s1", "SELECT 1"), sync()]);
        run.server(&[message(b'1', b""), rfq(b'I')]);
        // Re-parse fails on the new server (the table is gone, say): the client sees the error, and
        // the local CloseComplete after it is skipped as PostgreSQL would skip a real Close.
        run.client(&[bind("", "s1"), execute(), close_statement("s1"), sync()]);
        let got = run.server(&[message(b'E', b"SERROR\0C42P01\0\0"), rfq(b'I')]);
        assert_eq!(tags(&got), "EZ");
        assert!(run.r.is_idle());
        // Back in step afterwards.
        let sent = run.client(&[parse("s3", "SELECT 3"), sync()]);
        assert_eq!(tags(&sent), "PS");
        assert_eq!(tags(&run.server(&[message(b'1', b""), rfq(b'I')])), "1Z");
    }

    #[test]
    fn simple_queries_and_unnamed_statements_pass_untouched() {
        let mut run = Run::new();
        let q = message(b'Q', b"SELECT 1; SELECT 2\0");
        assert_eq!(run.client(std::slice::from_ref(&q)), q);
        let replies = [
            message(b'T', b"\0\0"),
            message(b'C', b"SELECT 1\0"),
            message(b'E', b"SERROR\0\0"),
            rfq(b'I'),
        ];
        let got = run.server(&replies);
        assert_eq!(
            got,
            replies.concat(),
            "an error in a simple query does not skip its ReadyForQuery"
        );
        let unnamed = [parse("", "SELECT 1"), bind("", ""), execute(), sync()];
        assert_eq!(run.client(&unnamed), unnamed.concat());
        assert_eq!(run.r.reparsed, 0);
    }

    #[test]
    fn framing_rejects_impossible_lengths_and_waits_for_whole_messages() {
        assert_eq!(next_message(b"Z\0\0\0").unwrap(), None);
        assert_eq!(next_message(b"Z\0\0\0\x05").unwrap(), None);
        assert_eq!(next_message(b"Z\0\0\0\x05I").unwrap(), Some((b'Z', 6)));
        assert!(next_message(b"Z\0\0\0\x03").is_err());
        assert!(next_message(b"Z\x7f\xff\xff\xff").is_err());
    }
}
