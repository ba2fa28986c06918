//! The operator's Service, as kube-proxy would give it to the agents: one address whose new
//! connections go to the operator replicas in turn (a replica that does not accept is skipped).
//! The agents are host processes of the lab, outside the pods' cgroups, so the mesh's own socket
//! load balancer does not apply to them; this stands in for the cluster's.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A round-robin TCP forwarder on loopback; stops on drop.
pub struct OperatorService {
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OperatorService {
    /// Listens on a free loopback port and forwards to `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(Mutex::new(backends));
        let next = Arc::new(AtomicUsize::new(0));
        let b = backends.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let list = b.lock().map(|l| l.clone()).unwrap_or_default();
                let first = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    for i in 0..list.len() {
                        let to = list[(first + i) % list.len()];
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            backends,
            task,
        })
    }

    /// `http://<addr>`: what agents subscribe to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a replica.
    pub fn add(&self, backend: SocketAddr) {
        if let Ok(mut b) = self.backends.lock() {
            b.push(backend);
        }
    }

    /// Removes a replica (its connections stay until they end).
    pub fn remove(&self, backend: SocketAddr) {
        if let Ok(mut b) = self.backends.lock() {
            b.retain(|a| *a != backend);
        }
    }
}

impl Drop for OperatorService {
    fn drop(&mut self) {
        self.task.abort();
    }
}
