//! The message port (TCP 5054), as in the original CortexFlow proxy: one JSON object per line,
//!
//! ```text
//! {"service":"<name>[.<namespace>]","direction":"Incoming","payload":"<base64>"}
//! ```
//!
//! The namespace defaults to `cortexflow`. The answer is one line,
//! `{"payload":"<base64 of {"status":"received"}>","service":"<name>.<namespace>","direction":"Outcoming"}`,
//! or `Delivery failed` (a message without `direction`, with invalid JSON or base64, for a
//! service that does not resolve or whose proxy does not answer) — the error is logged and the
//! connection keeps serving the next line.
//!
//! Who answers:
//! * a line from the pod's own app (loopback or the pod's address) is **forwarded**: the
//!   service's name `name.ns.svc.<cluster domain>` is resolved through the pod's resolver (the
//!   cluster DNS), a connection made to that address's port 5054 (the Service's `cf-messages`
//!   port; the kernel's Service load balancer picks the pod), TLS 1.3 with ALPN
//!   [`ALPN`], this proxy's certificate presented and the peer's verified (any SPIFFE id of the
//!   trust domain; which one is logged), the line sent and the one answer line relayed back;
//! * a line that arrives over mTLS (the first byte of the connection is a TLS handshake record)
//!   or in plaintext from another address ("straight to the destination's port") is
//!   **delivered** here: this proxy answers `received`.
//!
//! Metrics: `cortexflow_proxy_messages_total{way,result}` — way `forwarded` / `delivered`,
//! result `ok`, `invalid`, `unknown_service`, `failed`.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use cortexflow_trust::{member::Member, tls};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Meter},
};
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::{TcpListener, TcpStream},
};

/// The ALPN protocol of a message between proxies.
pub const ALPN: &[u8] = b"cortexflow-message/1";
/// The message port.
pub const PORT: u16 = 5054;
/// The namespace of a service named without one.
pub const DEFAULT_NAMESPACE: &str = "cortexflow";
/// The answer to a message that could not be delivered.
pub const DELIVERY_FAILED: &str = "Delivery failed";
/// The longest line read.
const MAX_LINE: usize = 1 << 20;
/// How long a delivery may take (resolve, connect, handshake, answer).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A message, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub name: String,
    pub namespace: String,
    pub payload: Vec<u8>,
}

impl Message {
    /// `name.namespace`.
    pub fn service(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// Why a line is not a message (the `invalid` result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::error::Error for Invalid {}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses one line.
pub fn parse(line: &str) -> Result<Message, Invalid> {
    #[derive(serde::Deserialize)]
    struct Line {
        service: Option<String>,
        direction: Option<String>,
        payload: Option<String>,
    }
    let l: Line = serde_json::from_str(line).map_err(|e| Invalid(format!("not JSON: {e}")))?;
    let service = l.service.ok_or_else(|| Invalid("no \"service\"".into()))?;
    match l.direction.as_deref() {
        Some("Incoming") => {}
        Some(other) => {
            return Err(Invalid(format!(
                "\"direction\" is {other:?}; a message sent is \"Incoming\""
            )));
        }
        None => return Err(Invalid("no \"direction\"".into())),
    }
    let payload = base64::engine::general_purpose::STANDARD
        .decode(l.payload.ok_or_else(|| Invalid("no \"payload\"".into()))?)
        .map_err(|e| Invalid(format!("\"payload\" is not base64: {e}")))?;
    let (name, namespace) = match service.split_once('.') {
        Some((n, ns)) => (n, ns),
        None => (service.as_str(), DEFAULT_NAMESPACE),
    };
    if !is_label(name) || !is_label(namespace) {
        return Err(Invalid(format!(
            "\"service\" {service:?} is not <name>[.<namespace>] (DNS labels)"
        )));
    }
    Ok(Message {
        name: name.into(),
        namespace: namespace.into(),
        payload,
    })
}

/// The answer line of a delivered message (without the newline).
pub fn received(m: &Message) -> String {
    serde_json::json!({
        "payload": base64::engine::general_purpose::STANDARD.encode(br#"{"status":"received"}"#),
        "service": m.service(),
        "direction": "Outcoming",
    })
    .to_string()
}

/// What the message port needs to know about its pod.
#[derive(Clone, Debug)]
pub struct Config {
    pub pod_ip: Option<IpAddr>,
    pub cluster_domain: String,
}

/// The message port's state.
pub struct Messages {
    id: Arc<Member>,
    cfg: Config,
    server_tls: tokio_rustls::TlsAcceptor,
    client_tls: tokio_rustls::TlsConnector,
    counted: Counter<u64>,
}

/// The `way` and `result` values of the messages metric.
pub const WAYS: [&str; 2] = ["forwarded", "delivered"];
pub const RESULTS: [&str; 4] = ["ok", "invalid", "unknown_service", "failed"];

impl Messages {
    /// The message port's state; every series of its metric present from the start (at 0).
    pub fn new(id: Arc<Member>, cfg: Config, meter: &Meter) -> anyhow::Result<Self> {
        let m = Self::build(id, cfg, meter)?;
        for way in WAYS {
            for result in RESULTS {
                m.count_n(way, result, 0);
            }
        }
        Ok(m)
    }

    fn build(id: Arc<Member>, cfg: Config, meter: &Meter) -> anyhow::Result<Self> {
        Ok(Self {
            server_tls: tls::peer_server_config(id.creds.clone(), id.trust.clone(), ALPN)?.into(),
            client_tls: tls::peer_client_config(id.creds.clone(), id.trust.clone(), ALPN)?.into(),
            id,
            cfg,
            counted: meter
                .u64_counter("proxy_messages")
                .with_description("Messages on the message port, by way (forwarded to another proxy, delivered here) and result (ok, invalid, unknown_service, failed)")
                .build(),
        })
    }

    fn count(&self, way: &'static str, result: &'static str) {
        self.count_n(way, result, 1);
    }

    fn count_n(&self, way: &'static str, result: &'static str, n: u64) {
        self.counted.add(
            n,
            &[KeyValue::new("way", way), KeyValue::new("result", result)],
        );
    }

    fn is_own(&self, peer: IpAddr) -> bool {
        peer.is_loopback() || Some(peer) == self.cfg.pod_ip
    }

    /// Delivers `m` to its service's proxy over mTLS; the answer line.
    async fn forward(&self, m: &Message) -> Result<String, (&'static str, String)> {
        let host = format!("{}.{}.svc.{}", m.name, m.namespace, self.cfg.cluster_domain);
        let addr = tokio::net::lookup_host((host.as_str(), PORT))
            .await
            .map_err(|e| ("unknown_service", format!("resolve {host}: {e}")))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| ("unknown_service", format!("{host} has no IPv4 address")))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ("failed", format!("connect to {host} ({addr}): {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut stream = self
            .client_tls
            .connect(name, tcp)
            .await
            .map_err(|e| ("failed", format!("mTLS with {host} ({addr}): {e}")))?;
        let peer = tls::peer_chain_id(stream.get_ref().1.peer_certificates(), &self.id.trust)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut line = serde_json::json!({
            "service": m.service(),
            "direction": "Incoming",
            "payload": base64::engine::general_purpose::STANDARD.encode(&m.payload),
        })
        .to_string();
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| ("failed", format!("send to {peer}: {e}")))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(|e| ("failed", format!("the answer of {peer}: {e}")))?;
        let answer = answer.trim_end().to_string();
        if answer.is_empty() || answer == DELIVERY_FAILED {
            return Err(("failed", format!("{peer} answered {answer:?}")));
        }
        tracing::info!(service = %m.service(), %addr, peer = %peer, bytes = m.payload.len(), "message delivered");
        Ok(answer)
    }

    /// The answer to one line.
    async fn answer(&self, line: &str, deliver_here: bool, from: &str) -> String {
        let way = if deliver_here {
            "delivered"
        } else {
            "forwarded"
        };
        let m = match parse(line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%from, error = %e, "message refused");
                self.count(way, "invalid");
                return DELIVERY_FAILED.into();
            }
        };
        if deliver_here {
            tracing::info!(%from, service = %m.service(), bytes = m.payload.len(), "message received");
            self.count(way, "ok");
            return received(&m);
        }
        match tokio::time::timeout(DELIVERY_TIMEOUT, self.forward(&m)).await {
            Ok(Ok(a)) => {
                self.count(way, "ok");
                a
            }
            Ok(Err((result, e))) => {
                tracing::warn!(service = %m.service(), error = %e, "message not delivered");
                self.count(way, result);
                DELIVERY_FAILED.into()
            }
            Err(_) => {
                tracing::warn!(service = %m.service(), "message not delivered: timed out");
                self.count(way, "failed");
                DELIVERY_FAILED.into()
            }
        }
    }

    /// Answers every line of `stream` in turn.
    async fn lines<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        deliver_here: bool,
        from: &str,
    ) {
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            match (&mut r).take(MAX_LINE as u64).read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = line.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                continue;
            }
            let mut out = self.answer(text, deliver_here, from).await;
            out.push('\n');
            if w.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// One connection: mTLS from another proxy, or plaintext.
    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let mut first = [0u8; 1];
        if !matches!(tcp.peek(&mut first).await, Ok(1)) {
            return;
        }
        if first[0] == 0x16 {
            let Ok(Ok(tls_stream)) =
                tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, self.server_tls.accept(tcp)).await
            else {
                tracing::info!(%peer, "message mTLS handshake refused");
                return;
            };
            let id = tls::peer_chain_id(tls_stream.get_ref().1.peer_certificates(), &self.id.trust)
                .ok()
                .flatten()
                .unwrap_or_default();
            self.lines(tls_stream, true, &id).await;
        } else {
            let own = self.is_own(peer.ip());
            self.lines(tcp, !own, &peer.to_string()).await;
        }
    }
}

/// Serves the message port until the drain.
pub async fn serve(
    listener: TcpListener,
    messages: Arc<Messages>,
    shutdown: cortexflow_runtime::drain::Signal,
) -> anyhow::Result<()> {
    crate::accept_until_drained(listener, shutdown, "messages", |tcp, peer| {
        tokio::spawn(messages.clone().connection(tcp, peer));
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn messages_parse_with_the_default_namespace() {
        let m = parse(&format!(
            r#"{{"service":"test-proxy2.cortexflow","direction":"Incoming","payload":"{}"}}"#,
            b64("hello")
        ))
        .unwrap();
        assert_eq!(
            m,
            Message {
                name: "test-proxy2".into(),
                namespace: "cortexflow".into(),
                payload: b"hello".to_vec()
            }
        );
        let m = parse(&format!(
            r#"{{"service":"backend","direction":"Incoming","payload":"{}"}}"#,
            b64("")
        ))
        .unwrap();
        assert_eq!(m.service(), "backend.cortexflow");
    }

    #[test]
    fn what_is_not_a_message_is_refused_with_why() {
        let p = b64("x");
        for (line, why) in [
            ("not json", "not JSON"),
            (r#"{"service":"a","payload":"eA=="}"#, "no \"direction\""),
            (
                r#"{"service":"a","direction":"Outcoming","payload":"eA=="}"#,
                "\"Outcoming\"",
            ),
            (
                r#"{"service":"a","direction":"Incoming","payload":"%%%"}"#,
                "not base64",
            ),
            (
                r#"{"direction":"Incoming","payload":"eA=="}"#,
                "no \"service\"",
            ),
            (
                &format!(r#"{{"service":"A.b","direction":"Incoming","payload":"{p}"}}"#),
                "DNS labels",
            ),
            (
                &format!(r#"{{"service":"a.b.c","direction":"Incoming","payload":"{p}"}}"#),
                "DNS labels",
            ),
            (
                r#"{"service":"a","direction":"Incoming"}"#,
                "no \"payload\"",
            ),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.0.contains(why), "{line}: {e} (want {why})");
        }
    }

    #[test]
    fn the_answer_is_the_original_proxys() {
        let m = parse(&format!(
            r#"{{"service":"test-proxy2","direction":"Incoming","payload":"{}"}}"#,
            b64("hi")
        ))
        .unwrap();
        let a: serde_json::Value = serde_json::from_str(&received(&m)).unwrap();
        assert_eq!(a["service"], "test-proxy2.cortexflow");
        assert_eq!(a["direction"], "Outcoming");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(a["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload, br#"{"status":"received"}"#);
    }
}
