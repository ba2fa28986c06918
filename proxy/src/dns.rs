//! The DNS port (5053, UDP and TCP): each query is forwarded as it is to the cluster DNS, over
//! the transport it came by, and its answer returned as it is. The proxy does not cache, rewrite or synthesize records: the cluster DNS
//! stays the one source of names. A query the upstream does not answer within
//! [`UPSTREAM_TIMEOUT`] (or that cannot be sent) gets SERVFAIL at once, so the client's
//! resolver moves on instead of waiting out its own timeout.
//!
//! Metrics: `cortexflow_proxy_dns_requests_total{result}` (`noerror`, `nxdomain`, `servfail`,
//! `refused`, `other` — the upstream's RCODE — or `upstream_failed`, `malformed`),
//! `cortexflow_proxy_dns_response_duration_seconds` (query to answer, every answered query) and
//! `cortexflow_proxy_dns_upstream_failures_total{reason}` (`timeout`, `error`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};
use tokio::net::UdpSocket;

/// How long the upstream has to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest DNS message over UDP with EDNS(0) the proxy relays.
const MAX_MESSAGE: usize = 4096;

/// The upstream: `ip[:port]` as given, else the first `nameserver` of /etc/resolv.conf, port 53.
pub fn upstream(flag: Option<&str>) -> anyhow::Result<SocketAddr> {
    match flag {
        Some(s) => parse_server(s).with_context(|| format!("--dns-upstream {s:?}")),
        None => {
            let conf = std::fs::read_to_string("/etc/resolv.conf")
                .context("read /etc/resolv.conf (or set --dns-upstream)")?;
            first_nameserver(&conf)
                .context("/etc/resolv.conf has no nameserver (set --dns-upstream)")
        }
    }
}

fn parse_server(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    Ok(SocketAddr::new(s.parse::<IpAddr>()?, 53))
}

/// The first `nameserver` line's address, port 53.
pub fn first_nameserver(conf: &str) -> Option<SocketAddr> {
    conf.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The DNS port's instruments.
#[derive(Clone)]
pub struct DnsMetrics {
    requests: Counter<u64>,
    duration: Histogram<f64>,
    upstream_failures: Counter<u64>,
}

/// Every `result` of the requests metric, and every `reason` of the upstream failures.
pub const RESULTS: [&str; 7] = [
    "noerror",
    "nxdomain",
    "servfail",
    "refused",
    "other",
    "upstream_failed",
    "malformed",
];
pub const FAILURES: [&str; 2] = ["timeout", "error"];

impl DnsMetrics {
    /// The instruments, every label value present from the start (at 0).
    pub fn new(meter: &Meter) -> Self {
        let m = Self::instruments(meter);
        for r in RESULTS {
            m.requests.add(0, &[KeyValue::new("result", r)]);
        }
        for r in FAILURES {
            m.upstream_failures.add(0, &[KeyValue::new("reason", r)]);
        }
        m
    }

    fn instruments(meter: &Meter) -> Self {
        Self {
            requests: meter
                .u64_counter("proxy_dns_requests")
                .with_description("DNS queries on the proxy's DNS port, by result: the upstream's RCODE (noerror, nxdomain, servfail, refused, other), upstream_failed, malformed")
                .build(),
            duration: meter
                .f64_histogram("proxy_dns_response_duration_seconds")
                .with_description("From a query's arrival to its answer, for every query answered")
                .with_boundaries(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .build(),
            upstream_failures: meter
                .u64_counter("proxy_dns_upstream_failures")
                .with_description("Queries the upstream DNS did not answer, by reason: timeout, error")
                .build(),
        }
    }
}

/// What the header of a message says, enough to relay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
}

/// The header of `msg`; `None` when it is shorter than a DNS header.
pub fn header(msg: &[u8]) -> Option<Header> {
    (msg.len() >= 12).then(|| Header {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        response: msg[2] & 0x80 != 0,
        rcode: msg[3] & 0x0f,
    })
}

/// The metric's result for an upstream answer's RCODE (one of [`RESULTS`]).
pub fn rcode_result(rcode: u8) -> &'static str {
    match rcode {
        0 => RESULTS[0],
        3 => RESULTS[1],
        2 => RESULTS[2],
        5 => RESULTS[3],
        _ => RESULTS[4],
    }
}

/// SERVFAIL for `query`: its header with QR set, RA copied from nothing (0), RCODE 2, the
/// question kept, no records (additional records — an OPT — dropped).
pub fn servfail(query: &[u8]) -> Vec<u8> {
    let mut out = query.to_vec();
    out[2] = (out[2] | 0x80) & !0x04; // QR = 1, AA = 0; opcode and RD as asked
    out[3] = 0x02; // RA = 0, RCODE = SERVFAIL
    // ANCOUNT, NSCOUNT, ARCOUNT = 0; the question section (QDCOUNT as asked) is kept only
    // when it is a single question whose end can be found.
    for b in &mut out[6..12] {
        *b = 0;
    }
    match question_end(query) {
        Some(end) if u16::from_be_bytes([query[4], query[5]]) == 1 => out.truncate(end),
        _ => {
            out[4] = 0;
            out[5] = 0;
            out.truncate(12);
        }
    }
    out
}

/// The end of the first question of `msg` (after QNAME, QTYPE, QCLASS).
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = *msg.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        if len & 0xc0 != 0 {
            return None; // a pointer in a question: not from a sane client
        }
        i += 1 + len;
    }
    (i + 4 <= msg.len()).then_some(i + 4)
}

/// Answers queries on `socket` until the drain.
pub async fn serve(
    socket: UdpSocket,
    upstream: SocketAddr,
    metrics: DnsMetrics,
    shutdown: cortexflow_runtime::drain::Signal,
) -> anyhow::Result<()> {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS receive failed");
                    continue;
                }
            },
            () = shutdown.signaled() => return Ok(()),
        };
        let query = buf[..n].to_vec();
        let at = Instant::now();
        match header(&query) {
            Some(h) if !h.response => {}
            _ => {
                metrics
                    .requests
                    .add(1, &[KeyValue::new("result", "malformed")]);
                continue;
            }
        }
        let (socket, metrics) = (socket.clone(), metrics.clone());
        tokio::spawn(async move {
            let answer = answer(&query, upstream, Transport::Udp, &metrics).await;
            match socket.send_to(&answer.0, from).await {
                Ok(_) => answer.1.count(&metrics, at),
                Err(e) => tracing::debug!(%from, error = %e, "DNS answer not sent"),
            }
        });
    }
}

/// How a query came, and goes on to the upstream: as it came (a client that got a truncated
/// answer over UDP asks again over TCP, and the large answer must come back whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The result of one query, counted once its answer is sent.
struct Answered(&'static str);

impl Answered {
    fn count(self, metrics: &DnsMetrics, at: Instant) {
        metrics.requests.add(1, &[KeyValue::new("result", self.0)]);
        metrics.duration.record(at.elapsed().as_secs_f64(), &[]);
    }
}

/// The upstream's answer to `query`, or SERVFAIL when it gives none.
async fn answer(
    query: &[u8],
    upstream: SocketAddr,
    transport: Transport,
    metrics: &DnsMetrics,
) -> (Vec<u8>, Answered) {
    let got = match transport {
        Transport::Udp => forward(query, upstream).await,
        Transport::Tcp => forward_tcp(query, upstream).await,
    };
    match got {
        Ok(a) => {
            let rcode = header(&a).map_or(2, |h| h.rcode);
            (a, Answered(rcode_result(rcode)))
        }
        Err(reason) => {
            metrics
                .upstream_failures
                .add(1, &[KeyValue::new("reason", reason)]);
            tracing::debug!(%upstream, reason, "DNS upstream failed; answering SERVFAIL");
            (servfail(query), Answered("upstream_failed"))
        }
    }
}

/// Answers DNS over TCP on `listener` (RFC 7766: two-byte length, then the message; several
/// queries per connection, answered in order) until the drain.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    metrics: DnsMetrics,
    shutdown: cortexflow_runtime::drain::Signal,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    crate::accept_until_drained(listener, shutdown, "dns", |mut tcp, from| {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                // An idle connection is closed after a while, as servers do.
                let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, tcp.read_u16()).await else {
                    return;
                };
                let mut query = vec![0u8; usize::from(len)];
                if tcp.read_exact(&mut query).await.is_err() {
                    return;
                }
                let at = Instant::now();
                if header(&query).is_none_or(|h| h.response) {
                    metrics
                        .requests
                        .add(1, &[KeyValue::new("result", "malformed")]);
                    return;
                }
                let (a, result) = answer(&query, upstream, Transport::Tcp, &metrics).await;
                let Ok(n) = u16::try_from(a.len()) else {
                    return;
                };
                let mut out = n.to_be_bytes().to_vec();
                out.extend(a);
                if let Err(e) = tcp.write_all(&out).await {
                    tracing::debug!(%from, error = %e, "DNS answer not sent");
                    return;
                }
                result.count(&metrics, at);
            }
        });
    })
    .await
}

/// How long a DNS connection may sit idle.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// One query to the upstream over TCP; the answer with the query's id.
async fn forward_tcp(query: &[u8], upstream: SocketAddr) -> Result<Vec<u8>, &'static str> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let id = header(query).map(|h| h.id).ok_or("error")?;
    let len = u16::try_from(query.len()).map_err(|_| "error")?;
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(upstream)
            .await
            .map_err(|_| "error")?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(query);
        tcp.write_all(&out).await.map_err(|_| "error")?;
        let n = tcp.read_u16().await.map_err(|_| "error")?;
        let mut a = vec![0u8; usize::from(n)];
        tcp.read_exact(&mut a).await.map_err(|_| "error")?;
        Ok::<_, &'static str>(a)
    };
    let a = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| "timeout")??;
    if header(&a).is_some_and(|h| h.response && h.id == id) {
        Ok(a)
    } else {
        Err("error")
    }
}

/// One query to the upstream from a socket of its own; the answer with the query's id.
async fn forward(query: &[u8], upstream: SocketAddr) -> Result<Vec<u8>, &'static str> {
    let id = header(query).map(|h| h.id).ok_or("error")?;
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "error")?
    } else {
        "[::]:0".parse().map_err(|_| "error")?
    };
    let sock = UdpSocket::bind(bind).await.map_err(|_| "error")?;
    sock.connect(upstream).await.map_err(|_| "error")?;
    sock.send(query).await.map_err(|_| "error")?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| "timeout")?
            .map_err(|_| "error")?;
        // Anything but the answer to this query (a late answer of another) is ignored.
        if header(&buf[..n]).is_some_and(|h| h.response && h.id == id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `a.b` type A, class IN, with an OPT record.
    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend([1, b'a', 1, b'b', 0, 0, 1, 0, 1]);
        q.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]); // OPT
        q
    }

    #[test]
    fn servfail_keeps_id_and_question_and_drops_the_rest() {
        let q = query();
        let s = servfail(&q);
        assert_eq!(
            header(&s),
            Some(Header {
                id: 0x1234,
                response: true,
                rcode: 2
            })
        );
        assert_eq!(s[2] & 0x01, 0x01, "RD as asked");
        assert_eq!(&s[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&s[12..], &q[12..21], "exactly the question");
    }

    #[test]
    fn servfail_of_a_garbled_question_is_a_bare_header() {
        let mut q = query();
        q.truncate(15); // the name runs past the end
        let s = servfail(&q);
        assert_eq!(s.len(), 12);
        assert_eq!(&s[4..6], &[0, 0]);
        assert_eq!(header(&s).map(|h| h.rcode), Some(2));
    }

    #[test]
    fn headers_rcodes_and_resolv_conf() {
        assert_eq!(header(&[0; 11]), None);
        let mut a = query();
        a[2] |= 0x80;
        a[3] = 0x83;
        assert_eq!(
            header(&a),
            Some(Header {
                id: 0x1234,
                response: true,
                rcode: 3
            })
        );
        assert_eq!(rcode_result(3), "nxdomain");
        assert_eq!(rcode_result(0), "noerror");
        assert_eq!(rcode_result(9), "other");
        let conf = "search shop.svc.cluster.local svc.cluster.local\n# nameserver 1.1.1.1\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n";
        assert_eq!(
            first_nameserver(conf),
            Some("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("options ndots:5\n"), None);
        assert_eq!(parse_server("127.0.0.1:1053").unwrap().port(), 1053);
        assert_eq!(parse_server("10.0.0.1").unwrap().port(), 53);
        assert!(parse_server("dns.example").is_err());
    }
}
