//! The node simulator's kubelet API: what `kubectl logs` reaches through the apiserver.
//!
//! Each simulated node serves HTTPS on a loopback port (the apiserver runs on the machine's
//! loopback; the node's own address is inside its namespace), which its Node object publishes
//! as `status.daemonEndpoints.kubeletEndpoint.Port` with the address `InternalDNS: localhost`
//! (the apiserver prefers InternalDNS: `--kubelet-preferred-address-types`). The serving
//! certificate is for `localhost`, signed by the cluster CA, which the apiserver verifies
//! (`--kubelet-certificate-authority`); the only client accepted is the apiserver's kubelet
//! client certificate (`kube-apiserver-kubelet-client`, cluster CA): any other certificate, or
//! none, fails the handshake. Authorization of the user happened at the apiserver (`pods/log`).
//!
//! Served: `GET /containerLogs/{namespace}/{pod}/{container}` with `tailLines`, `limitBytes`
//! and `follow` (until the client goes or the log file does), and `/healthz`. Refused with 400
//! and the reason, never ignored: `previous` (restarts append to one file), `timestamps`,
//! `sinceSeconds` and `sinceTime` (no times are recorded). Not served (404 with the reason):
//! `exec`, `attach`, `portForward` and the rest of the kubelet's API.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use rustls::{
    DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

/// The common name of the apiserver's client certificate towards kubelets.
pub const APISERVER_CLIENT: &str = "kube-apiserver-kubelet-client";

/// The files the kubelet API needs (written by the cluster's PKI).
#[derive(Clone, Debug)]
pub struct KubeletTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA: the apiserver's client certificate chains to it.
    pub ca: PathBuf,
}

#[derive(Clone)]
struct Ctx {
    client: kube::Client,
    node: String,
    logs: PathBuf,
}

/// Accepts only certificates of the cluster CA whose common name is [`APISERVER_CLIENT`].
#[derive(Debug)]
struct ApiserverOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ApiserverOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.0.verify_client_cert(end_entity, intermediates, now)?;
        let cn = x509_parser::parse_x509_certificate(end_entity)
            .ok()
            .and_then(|(_, c)| {
                c.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|n| n.as_str().ok().map(str::to_string))
            });
        if cn.as_deref() != Some(APISERVER_CLIENT) {
            return Err(rustls::Error::General(format!(
                "the lab's kubelet serves the apiserver only, not {cn:?}"
            )));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn server_config(tls: &KubeletTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca).context("read the cluster CA")? {
        roots.add(c?)?;
    }
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .context("read the kubelet's certificate")?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).context("read the kubelet's key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ApiserverOnly(inner)))
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves node `node`'s kubelet API on a free loopback port until `stop`; returns the port.
pub async fn start(
    client: kube::Client,
    node: &str,
    logs: PathBuf,
    tls: &KubeletTls,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let config = server_config(tls)?;
    let port = cortexflow_testkit::process::free_port()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .fallback(|uri: axum::http::Uri| async move {
            (
                StatusCode::NOT_FOUND,
                format!(
                    "{}: the lab's node simulator serves containerLogs only (no exec, attach or port-forward)\n",
                    uri.path()
                ),
            )
        })
        .with_state(Ctx {
            client,
            node: node.to_string(),
            logs,
        });
    let node = node.to_string();
    let task = tokio::spawn(async move {
        if let Err(e) = cortexflow_trust::tls::serve_http(app, listener, config, stop).await {
            tracing::warn!(%node, error = %format!("{e:#}"), "the kubelet API stopped");
        }
    });
    Ok((port, task))
}

/// The log file of container `container` of pod `ns/pod`: the first app container's keeps
/// the pod's name, the others are named after their container (see `sim`).
pub fn log_file(ns: &str, pod: &str, container: &str, first_app: bool) -> String {
    if first_app {
        format!("{ns}_{pod}.log")
    } else {
        format!("{ns}_{pod}_{container}.log")
    }
}

fn bad(status: StatusCode, msg: String) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn container_logs(
    State(ctx): State<Ctx>,
    UrlPath((ns, name, container)): UrlPath<(String, String, String)>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    for (k, why) in [
        (
            "previous",
            "the lab's node simulator appends every restart to one log: there is no previous one",
        ),
        (
            "timestamps",
            "the lab's node simulator records no timestamps",
        ),
        (
            "sinceSeconds",
            "the lab's node simulator records no timestamps",
        ),
        (
            "sinceTime",
            "the lab's node simulator records no timestamps",
        ),
    ] {
        if q.get(k).is_some_and(|v| v != "false") {
            return bad(StatusCode::BAD_REQUEST, format!("{k}: {why}"));
        }
    }
    let number = |k: &str| -> Result<Option<u64>, String> {
        q.get(k)
            .map(|v| v.parse::<u64>().map_err(|e| format!("{k}={v}: {e}")))
            .transpose()
    };
    let (tail, limit) = match (number("tailLines"), number("limitBytes")) {
        (Ok(t), Ok(l)) => (t, l),
        (Err(e), _) | (_, Err(e)) => return bad(StatusCode::BAD_REQUEST, e),
    };
    let follow = q.get("follow").is_some_and(|v| v == "true");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = match api.get_opt(&name).await {
        Ok(Some(p)) => p,
        Ok(None) => return bad(StatusCode::NOT_FOUND, format!("pod {ns}/{name} not found")),
        Err(e) => return bad(StatusCode::SERVICE_UNAVAILABLE, format!("read pod: {e}")),
    };
    let spec = pod.spec.unwrap_or_default();
    if spec.node_name.as_deref() != Some(ctx.node.as_str()) {
        return bad(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{name} does not run on {}", ctx.node),
        );
    }
    let first_app = spec.containers.first().map(|c| c.name.as_str()) == Some(container.as_str());
    let known = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == container);
    if !known {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("container {container} is not valid for pod {name}"),
        );
    }
    let path = ctx.logs.join(log_file(&ns, &name, &container, first_app));
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return bad(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("read the log: {e}"),
            );
        }
    };
    let start = tail.map_or(0, |n| tail_start(&text, n as usize));
    let mut first = text[start..].to_vec();
    if let Some(l) = limit {
        first.truncate(l as usize);
    }
    if !follow {
        return (StatusCode::OK, first).into_response();
    }
    // Follow: what is there, then what is appended, until the client or the file goes.
    let offset = text.len() as u64;
    let left = limit.map(|l| l.saturating_sub(first.len() as u64));
    let stream = futures::stream::unfold(
        (Some(first), offset, path, left),
        |(first, mut offset, path, mut left)| async move {
            if let Some(f) = first {
                return Some((Ok::<_, std::io::Error>(f), (None, offset, path, left)));
            }
            loop {
                if left == Some(0) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(data) = std::fs::read(&path) else {
                    return None;
                };
                if (data.len() as u64) > offset {
                    let mut chunk = data[offset as usize..].to_vec();
                    offset = data.len() as u64;
                    if let Some(l) = left.as_mut() {
                        chunk.truncate(*l as usize);
                        *l -= chunk.len() as u64;
                    }
                    return Some((Ok(chunk), (None, offset, path, left)));
                }
            }
        },
    );
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

/// Where the last `n` lines of `text` start.
pub fn tail_start(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    // A final newline ends the last line; it does not start another.
    let end = if text.last() == Some(&b'\n') {
        text.len() - 1
    } else {
        text.len()
    };
    let mut seen = 0;
    for i in (0..end).rev() {
        if text[i] == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lines_counts_from_the_end() {
        let t = b"a\nb\nc\n";
        assert_eq!(&t[tail_start(t, 1)..], b"c\n");
        assert_eq!(&t[tail_start(t, 2)..], b"b\nc\n");
        assert_eq!(&t[tail_start(t, 9)..], b"a\nb\nc\n");
        assert_eq!(&t[tail_start(t, 0)..], b"");
        let u = b"a\nb";
        assert_eq!(&u[tail_start(u, 1)..], b"b");
        assert_eq!(tail_start(b"", 3), 0);
    }
}
