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
