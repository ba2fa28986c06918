//! mTLS for the control channel (and, later, the proxies), over state that changes without a
//! restart: [`Credentials`] (this party's key and chain, replaced on renewal) and
//! [`TrustStore`] (the bundle, replaced on rotation). Both are read at every handshake, so a
//! renewed certificate or a new root serves the next connection; connections already open stay
//! up.
//!
//! * The server ([`server_config`]) asks every client for a certificate but does not require
//!   one (the certificate API authenticates callers by their token); a certificate that is
//!   presented must verify (chain to the bundle, client EKU, a SPIFFE id of our trust domain) or
//!   the handshake fails. Which id may do what is the service's decision: [`peer_id`].
//! * The client ([`client_config`]) verifies the server's chain and that its SPIFFE id is
//!   exactly the one it expects — names and addresses are not used.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt as _, stream::FuturesUnordered};
use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};

use crate::verify::{Bundle, PeerError, Usage, verify_peer};

/// The crypto provider of every CortexFlow TLS endpoint.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This party's key and certificate chain, replaceable at any time.
#[derive(Debug, Default)]
pub struct Credentials {
    current: RwLock<Option<Current>>,
}

#[derive(Debug, Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    spiffe_id: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Credentials {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a key (PKCS#8 DER) and its chain (leaf first).
    pub fn set(
        &self,
        key_pkcs8: Vec<u8>,
        chain: Vec<CertificateDer<'static>>,
        spiffe_id: String,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<()> {
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)))
            .map_err(|e| anyhow::anyhow!("load the private key: {e}"))?;
        let key = Arc::new(CertifiedKey::new(chain, signing));
        if let Ok(mut c) = self.current.write() {
            *c = Some(Current {
                key,
                spiffe_id,
                not_before,
                not_after,
            });
        }
        Ok(())
    }

    /// Installs what the CA issued for `key` (a leaf of [`crate::Authority`]).
    pub fn set_issued(&self, key: &rcgen::KeyPair, issued: crate::Issued) -> anyhow::Result<()> {
        self.set(
            key.serialize_der(),
            issued.chain,
            issued.spiffe_id,
            issued.not_before,
            issued.not_after,
        )
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok()?.as_ref().map(|c| c.key.clone())
    }

    /// The chain of the current certificate (leaf first).
    pub fn chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.key().map(|k| k.cert.clone())
    }

    /// `(spiffe id, notBefore, notAfter)` of the current certificate.
    pub fn current(&self) -> Option<(String, SystemTime, SystemTime)> {
        let c = self.current.read().ok()?;
        c.as_ref()
            .map(|c| (c.spiffe_id.clone(), c.not_before, c.not_after))
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.key().is_some()
    }
}

/// The trust bundle of a trust domain, replaceable at any time.
#[derive(Debug)]
pub struct TrustStore {
    trust_domain: String,
    bundle: RwLock<Arc<Bundle>>,
}

impl TrustStore {
    pub fn new(trust_domain: &str, bundle: Bundle) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.to_string(),
            bundle: RwLock::new(Arc::new(bundle)),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        match self.bundle.read() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the bundle; returns whether it changed.
    pub fn set(&self, bundle: Bundle) -> bool {
        let mut b = match self.bundle.write() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if b.ders() == bundle.ders() {
            return false;
        }
        *b = Arc::new(bundle);
        true
    }

    /// The peer's SPIFFE id if `chain` verifies for `usage` now.
    pub fn verify(&self, chain: &[CertificateDer<'_>], usage: Usage) -> Result<String, PeerError> {
        verify_peer(
            &self.bundle(),
            chain,
            SystemTime::now(),
            usage,
            &self.trust_domain,
        )
    }
}

fn tls_error(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        PeerError::Expired => rustls::CertificateError::Expired,
        PeerError::NotYetValid => rustls::CertificateError::NotValidYet,
        PeerError::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
        other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Both verifiers speak TLS 1.3 only.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Verifies servers: chain to the bundle and exactly the expected SPIFFE id.
#[derive(Debug)]
struct ServerVerifier {
    trust: Arc<TrustStore>,
    /// The server's exact SPIFFE id; `None`: any id of the trust domain (a mesh peer).
    expect: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = self
            .trust
            .verify(&chain, Usage::Server)
            .map_err(tls_error)?;
        if let Some(want) = &self.expect
            && id != *want
        {
            return Err(tls_error(PeerError::WrongId {
                got: id,
                want: want.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Verifies the certificates clients present (they need not present one).
#[derive(Debug)]
struct ClientVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    /// Whether a client without a certificate is refused in the handshake.
    mandatory: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        self.trust
            .verify(&chain, Usage::Client)
            .map_err(tls_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// A TLS 1.3 server serving `creds`, verifying client certificates against `trust`; ALPN h2.
pub fn server_config(
    creds: Arc<Credentials>,
    trust: Arc<TrustStore>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    mesh_server(creds, trust, false, b"h2")
}

fn mesh_server(
    creds: Arc<Credentials>,
    trust: Arc<TrustStore>,
    mandatory: bool,
    alpn: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            trust,
            provider,
            mandatory,
        }))
        .with_cert_resolver(creds);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// Between mesh peers (the mTLS proxies): a TLS 1.3 server serving `creds` that refuses any
/// client without a certificate of `trust`'s domain; ALPN `alpn` only.
pub fn peer_server_config(
    creds: Arc<Credentials>,
    trust: Arc<TrustStore>,
    alpn: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    mesh_server(creds, trust, true, alpn)
}

/// Between mesh peers: a TLS 1.3 client presenting `creds` that accepts a server with any
/// SPIFFE id of `trust`'s domain (the caller reads which with [`peer_chain_id`]); ALPN `alpn`.
pub fn peer_client_config(
    creds: Arc<Credentials>,
    trust: Arc<TrustStore>,
    alpn: &[u8],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    mesh_client(Some(creds), trust, None, alpn)
}

/// The verified SPIFFE id of the peer of a finished handshake (`None`: it presented no
/// certificate).
pub fn peer_chain_id(
    certs: Option<&[CertificateDer<'static>]>,
    trust: &TrustStore,
) -> Result<Option<String>, PeerError> {
    match certs {
        Some(chain) if !chain.is_empty() => trust.verify(chain, Usage::Client).map(Some),
        _ => Ok(None),
    }
}

/// A TLS 1.3 server serving `creds` that asks for no client certificate (HTTPS callers that
/// authenticate otherwise, such as the kube-apiserver calling a webhook); ALPN h2, http/1.1.
pub fn server_config_http(creds: Arc<Credentials>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(creds);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 client that accepts only the server `expect` (a SPIFFE id) of `trust`, presenting
/// `creds` when it has them; ALPN h2.
pub fn client_config(
    creds: Option<Arc<Credentials>>,
    trust: Arc<TrustStore>,
    expect: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    mesh_client(creds, trust, Some(expect.to_string()), b"h2")
}

/// A TLS 1.3 client of `trust` accepting the server `expect` (any id of the trust domain when
/// `None`), presenting `creds` when it has them.
fn mesh_client(
    creds: Option<Arc<Credentials>>,
    trust: Arc<TrustStore>,
    expect: Option<String>,
    alpn: &[u8],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            trust,
            expect,
            provider,
        }));
    let mut cfg = match creds {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The verified SPIFFE id of a gRPC caller (its client certificate was verified in the
/// handshake); `None` when it presented none.
pub fn peer_id<T>(
    req: &tonic::Request<T>,
    trust: &TrustStore,
) -> Result<Option<String>, PeerError> {
    peer_chain_id(req.peer_certs().as_deref().map(Vec::as_slice), trust)
}

/// TLS connections accepted on `listener`, handshakes run concurrently (a slow or failing
/// client holds up no other); failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    type Handshake = std::pin::Pin<
        Box<
            dyn Future<
                    Output = (
                        SocketAddr,
                        Result<
                            io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
                            tokio::time::error::Elapsed,
                        >,
                    ),
                > + Send,
        >,
    >;
    let pending: FuturesUnordered<Handshake> = FuturesUnordered::new();
    futures::stream::unfold(
        (listener, acceptor, pending),
        |(listener, acceptor, mut pending)| async move {
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((tcp, peer)) => {
                            let _ = tcp.set_nodelay(true);
                            let acceptor = acceptor.clone();
                            pending.push(Box::pin(async move {
                                (peer, tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await)
                            }));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    Some((peer, r)) = pending.next(), if !pending.is_empty() => match r {
                        Ok(Ok(tls)) => return Some((Ok(tls), (listener, acceptor, pending))),
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    },
                }
            }
        },
    )
}

/// A tonic connector that dials TCP and runs the TLS handshake with `config`.
pub fn connector(
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(move |uri: http::Uri| {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)
                .map_err(|e| io::Error::other(format!("server name: {e}")))?;
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// `https://host:port`, `http://host:port` or `host:port` as the URI tonic dials (the scheme
/// is only a label here: the connector always runs TLS).
pub fn endpoint_uri(addr: &str) -> String {
    let rest = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr);
    format!("http://{rest}")
}

/// Serves a tonic router over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    router
        .serve_with_incoming_shutdown(incoming(listener, config), shutdown)
        .await?;
    Ok(())
}

/// Serves an HTTP router (HTTP/1.1 and HTTP/2) over TLS on `listener` until `shutdown`
/// resolves; each connection runs as its own task, ended with the server.
pub async fn serve_http(
    app: axum::Router,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let conns = incoming(listener, config);
    tokio::pin!(conns);
    tokio::pin!(shutdown);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            c = conns.next() => match c {
                Some(Ok(tls)) => {
                    let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                    tasks.spawn(async move {
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        if let Err(e) = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await
                        {
                            tracing::debug!(error = %e, "HTTPS connection ended with an error");
                        }
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "accepting an HTTPS connection failed"),
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{Authority, ca::DEFAULT_LEAF_LIFETIME};

    const TD: &str = "cluster.local";
    const ALPN: &[u8] = b"cortexflow-test/1";

    /// Credentials for `id` from `ca`.
    fn creds(ca: &Authority, id: &str) -> Arc<Credentials> {
        let (key, issued) = ca
            .issue_own(id, DEFAULT_LEAF_LIFETIME, SystemTime::now())
            .unwrap();
        let c = Credentials::new();
        c.set_issued(&key, issued).unwrap();
        c
    }

    /// One connection from a client presenting `client` (or nothing) to a peer server of `ca`:
    /// the id the server verified, or the error either side saw.
    async fn exchange(ca: &Authority, client: Option<Arc<Credentials>>) -> Result<String, String> {
        let trust = TrustStore::new(TD, ca.bundle().clone());
        let server = peer_server_config(
            creds(ca, "spiffe://cluster.local/ns/b/sa/server"),
            trust.clone(),
            ALPN,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = trust.clone();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let id = peer_chain_id(tls.get_ref().1.peer_certificates(), &t)
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            tls.write_all(b"hi").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let client_cfg = match client {
            Some(c) => peer_client_config(c, trust, ALPN).unwrap(),
            None => mesh_client(None, trust, None, ALPN).unwrap(),
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let got = async {
            let mut tls = tokio_rustls::TlsConnector::from(client_cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let client_result = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .map_err(|_| "timed out".to_string())?;
        let server_result = accept.await.unwrap();
        client_result?;
        server_result
    }

    #[tokio::test]
    async fn peers_must_present_a_certificate_of_the_mesh() {
        let ca = Authority::generate(TD, SystemTime::now()).unwrap();
        let other = Authority::generate(TD, SystemTime::now()).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/client";
        assert_eq!(
            exchange(&ca, Some(creds(&ca, id))).await,
            Ok(id.to_string())
        );
        assert!(exchange(&ca, None).await.is_err(), "no client certificate");
        assert!(
            exchange(&ca, Some(creds(&other, id))).await.is_err(),
            "another CA's certificate"
        );
    }
}
