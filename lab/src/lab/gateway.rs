//! How pods reach the control plane. The apiserver and the operator run on the machine's
//! loopback, which no node or pod namespace can reach; a real cluster's pods reach the
//! apiserver through the `kubernetes` Service. The lab gives the fabric (the bridge between the
//! nodes, a namespace of its own) the address [`GATEWAY_IP`] and listens there, relaying each
//! TCP connection to its loopback target: no traffic leaves the namespaces the lab created and
//! the machine's loopback. The `kubernetes` Service's EndpointSlice (the apiserver runs with
//! `--endpoint-reconciler-type=none`) names the gateway, so pods use `10.96.0.1:443` — through the
//! agents' socket load balancer, as on a real node — and verify the apiserver's certificate,
//! which has that address.
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use cortexflow_testkit::net::Netns;

/// The gateway's address on the fabric.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);

/// Relays from the fabric to loopback, stopped on drop.
pub struct Gateway {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Gives the fabric [`GATEWAY_IP`] and a route back to each node's pods (`(pod CIDR, node
    /// address)`), and relays `GATEWAY_IP:port` to `target` for each forward.
    pub fn start(
        fabric: &Netns,
        nodes: &[(String, Ipv4Addr)],
        forwards: &[(u16, SocketAddr)],
    ) -> anyhow::Result<Self> {
        fabric.ip(&["addr", "replace", &format!("{GATEWAY_IP}/24"), "dev", "br0"]);
        for (cidr, via) in nodes {
            fabric.ip(&["route", "replace", cidr, "via", &via.to_string()]);
        }
        let mut g = Self { tasks: Vec::new() };
        for (port, target) in forwards {
            g.forward(fabric, *port, *target)?;
        }
        Ok(g)
    }

    /// Relays `GATEWAY_IP:port` to `target` from now on.
    pub fn forward(&mut self, fabric: &Netns, port: u16, target: SocketAddr) -> anyhow::Result<()> {
        // The listening socket is made inside the fabric's namespace, on a thread of its own;
        // connections to the target are made from the runtime's threads, on loopback.
        let path = fabric.path();
        let listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            cortexflow_testkit::net::enter(&path)?;
            let l = std::net::TcpListener::bind((GATEWAY_IP, port))
                .with_context(|| format!("bind the gateway {GATEWAY_IP}:{port}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the gateway's thread panicked"))??;
        let l = tokio::net::TcpListener::from_std(listener)?;
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut down, from)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(target).await {
                        Ok(mut up) => {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                        Err(e) => {
                            tracing::warn!(%from, port, %target, error = %e, "gateway: the target refused")
                        }
                    }
                });
            }
        }));
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// The way back in, for the lab's Prometheus (a host process, like the operator): an HTTP
    /// forward proxy on loopback (Prometheus' `proxy_url`) that carries a scrape of a pod
    /// address (in `pods`, the pod network) into the fabric and to the pod. Only GETs of pod
    /// addresses are carried; anything else gets 403. Returns the proxy's address.
    pub async fn pod_scrapes(
        &mut self,
        fabric: &Netns,
        pods: (Ipv4Addr, u8),
    ) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let path = fabric.path();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let path = path.clone();
                tokio::spawn(async move {
                    if let Err(e) = scrape(client, &path, pods).await {
                        tracing::debug!(error = %format!("{e:#}"), "gateway: a pod scrape failed");
                    }
                });
            }
        }));
        Ok(addr)
    }
}

/// Whether `ip` is in `net/prefix`.
fn within(ip: Ipv4Addr, (net, prefix): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// One proxied request: `GET http://<pod>:<port>/<path> HTTP/1.1` and its headers, sent on to
/// the pod from a socket made in the fabric's namespace, the answer copied back.
async fn scrape(
    mut client: tokio::net::TcpStream,
    fabric: &std::path::Path,
    pods: (Ipv4Addr, u8),
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).await?;
        anyhow::ensure!(n > 0 && head.len() < 16 * 1024, "no request head");
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let target = match first.split(' ').collect::<Vec<_>>()[..] {
        ["GET", t, _] => t.strip_prefix("http://").map(str::to_string),
        _ => None,
    };
    let Some((authority, rest)) = target.as_deref().and_then(|t| {
        let (a, p) = t.split_once('/').unwrap_or((t, ""));
        Some((a.parse::<SocketAddr>().ok()?, format!("/{p}")))
    }) else {
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await?;
        return Ok(());
    };
    let SocketAddr::V4(v4) = authority else {
        anyhow::bail!("not IPv4: {authority}");
    };
    if !within(*v4.ip(), pods) {
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut request = format!("GET {rest} HTTP/1.1\r\n");
    for l in lines.take_while(|l| !l.is_empty()) {
        let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
        if !name.starts_with("proxy-") && name != "connection" {
            request.push_str(l);
            request.push_str("\r\n");
        }
    }
    request.push_str("connection: close\r\n\r\n");
    // The socket is made (and connected) on a thread inside the fabric's namespace; it stays
    // there whatever thread then uses it.
    let fabric = fabric.to_path_buf();
    let upstream = std::thread::spawn(move || -> anyhow::Result<std::net::TcpStream> {
        cortexflow_testkit::net::enter(&fabric)?;
        let s =
            std::net::TcpStream::connect_timeout(&authority, std::time::Duration::from_secs(3))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the scrape's thread panicked"))??;
    let mut upstream = tokio::net::TcpStream::from_std(upstream)?;
    upstream.write_all(request.as_bytes()).await?;
    tokio::io::copy(&mut upstream, &mut client).await?;
    client.shutdown().await?;
    Ok(())
}

/// The `kubernetes` Service's EndpointSlice: the apiserver at the gateway.
pub fn kubernetes_endpoints() -> serde_json::Value {
    endpoints("default", "kubernetes", "https", 443)
}

/// The EndpointSlice of Service `namespace/service` (one without a selector): the gateway's
/// `port`, named `port_name` as the Service's port is.
pub fn endpoints(namespace: &str, service: &str, port_name: &str, port: u16) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": service,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "cortexflow-lab",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [GATEWAY_IP.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    })
}
