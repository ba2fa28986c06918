//! Reaching the cluster and the agents.
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use cortexflow_proto::flows::v1::flows_client::FlowsClient;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams};

/// How to reach the cluster and the agents (flags shared by every command).
#[derive(clap::Args, Clone, Debug)]
pub struct ConnectArgs {
    /// The kubeconfig (default: $KUBECONFIG, then ~/.kube/config, as kubectl).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace CortexFlow is installed in.
    #[arg(long, global = true, default_value = "cortexflow")]
    pub cortexflow_namespace: String,
    /// The bearer token for the agents' Flows API (a user allowed to `get`
    /// `flows.mesh.cortexflow.io`). Default: the kubeconfig user's token.
    #[arg(long, global = true, env = "CFCLI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding that token.
    #[arg(long, global = true, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// An agent's flow endpoint, `NODE=HOST:PORT` (repeat for each node). Default: the pods of
    /// the agent DaemonSet, at their host IP and `grpc` port.
    #[arg(long = "agent", global = true, value_name = "NODE=ADDR")]
    pub agents: Vec<String>,
    /// The SPIFFE trust domain the agents' certificates belong to.
    #[arg(long, global = true, default_value = "cluster.local")]
    pub trust_domain: String,
}

/// An agent's Flows API endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub node: String,
    pub addr: String,
}

/// What every command reaches: the Kubernetes API and the agents.
pub struct Cluster {
    pub client: kube::Client,
    pub args: ConnectArgs,
}

impl Cluster {
    pub async fn connect(args: &ConnectArgs) -> anyhow::Result<Self> {
        let options = kube::config::KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        let config = match &args.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &options).await?
            }
            None => kube::Config::from_kubeconfig(&options)
                .await
                .or(kube::Config::infer().await.map_err(anyhow::Error::from))
                .context("find the Kubernetes API (a kubeconfig, or in-cluster)")?,
        };
        Ok(Self {
            client: kube::Client::try_from(config)?,
            args: args.clone(),
        })
    }

    /// The bearer token: `--token`, `--token-file`, else the kubeconfig user's token.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.args.token {
            return Ok(t.trim().to_string());
        }
        if let Some(f) = &self.args.token_file {
            return Ok(std::fs::read_to_string(f)
                .with_context(|| format!("read the token file {}", f.display()))?
                .trim()
                .to_string());
        }
        let kc = match &self.args.kubeconfig {
            Some(p) => kube::config::Kubeconfig::read_from(p)?,
            None => kube::config::Kubeconfig::read()?,
        };
        let context_name = self
            .args
            .context
            .clone()
            .or(kc.current_context.clone())
            .context("the kubeconfig has no current context")?;
        let user = kc
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.user.clone().unwrap_or_default())
            .context("the kubeconfig's context has no user")?;
        let auth = kc
            .auth_infos
            .iter()
            .find(|a| a.name == user)
            .and_then(|a| a.auth_info.as_ref());
        if let Some(a) = auth {
            if let Some(t) = &a.token {
                use secrecy::ExposeSecret as _;
                return Ok(t.expose_secret().trim().to_string());
            }
            if let Some(f) = &a.token_file {
                return Ok(std::fs::read_to_string(f)?.trim().to_string());
            }
        }
        bail!(
            "the Flows API needs a bearer token and the kubeconfig user {user:?} has none (client certificates cannot be reviewed as tokens): pass --token or --token-file, e.g. `kubectl create token <account>` of an account bound to the ClusterRole cortexflow-flows-reader"
        )
    }

    /// The trust bundle the agents' certificates chain to (the ConfigMap the operator
    /// publishes).
    pub async fn trust(&self) -> anyhow::Result<std::sync::Arc<cortexflow_trust::TrustStore>> {
        let cms: Api<ConfigMap> =
            Api::namespaced(self.client.clone(), &self.args.cortexflow_namespace);
        let cm = cms.get("cortexflow-ca-bundle").await.with_context(|| {
            format!(
                "read the trust bundle (ConfigMap {}/cortexflow-ca-bundle)",
                self.args.cortexflow_namespace
            )
        })?;
        let pem = cm
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("the ConfigMap cortexflow-ca-bundle has no ca.crt")?;
        Ok(cortexflow_trust::TrustStore::new(
            &self.args.trust_domain,
            cortexflow_trust::Bundle::from_pem(pem.as_bytes())?,
        ))
    }

    /// The agents: `--agent`, else the running pods of the agent DaemonSet.
    pub async fn agents(&self) -> anyhow::Result<Vec<AgentEndpoint>> {
        if !self.args.agents.is_empty() {
            return self.args.agents.iter().map(|a| parse_agent(a)).collect();
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.args.cortexflow_namespace);
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=cortexflow-agent"))
            .await
            .context("list the agent pods")?;
        let mut out = Vec::new();
        for p in list.items {
            let spec = p.spec.as_ref();
            let node = spec.and_then(|s| s.node_name.clone());
            let host_ip = p.status.as_ref().and_then(|s| s.host_ip.clone());
            let port = spec
                .into_iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| cp.name.as_deref() == Some("grpc"))
                .map(|cp| cp.container_port);
            if let (Some(node), Some(ip), Some(port)) = (node, host_ip, port) {
                out.push(AgentEndpoint {
                    node,
                    addr: format!("{ip}:{port}"),
                });
            }
        }
        if out.is_empty() {
            bail!(
                "no running agent pods (label app.kubernetes.io/name=cortexflow-agent) in namespace {}: is CortexFlow installed there? Pass --agent NODE=ADDR for agents that do not run as pods",
                self.args.cortexflow_namespace
            );
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// A Flows client of `agent`: TLS verifying the agent's node id, the bearer token on every
    /// call.
    pub async fn flows_client(
        &self,
        agent: &AgentEndpoint,
        trust: std::sync::Arc<cortexflow_trust::TrustStore>,
        token: &str,
    ) -> anyhow::Result<FlowsClient<AuthedChannel>> {
        let tls = cortexflow_trust::tls::client_config(
            None,
            trust,
            &cortexflow_domain::spiffe::node_agent(&self.args.trust_domain, &agent.node),
        )?;
        let channel = tonic::transport::Endpoint::from_shared(
            cortexflow_trust::tls::endpoint_uri(&agent.addr),
        )?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(cortexflow_trust::tls::connector(tls))
        .await
        .with_context(|| format!("connect to the agent of {} at {}", agent.node, agent.addr))?;
        let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .context("the token is not a valid header value")?;
        Ok(FlowsClient::with_interceptor(channel, Bearer(header)))
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// `NODE=HOST:PORT`.
pub fn parse_agent(s: &str) -> anyhow::Result<AgentEndpoint> {
    let (node, addr) = s
        .split_once('=')
        .filter(|(n, a)| !n.is_empty() && a.contains(':'))
        .with_context(|| format!("--agent {s:?}: expected NODE=HOST:PORT"))?;
    Ok(AgentEndpoint {
        node: node.to_string(),
        addr: addr.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_flags() {
        assert_eq!(
            parse_agent("n1=10.0.0.1:8091").unwrap(),
            AgentEndpoint {
                node: "n1".into(),
                addr: "10.0.0.1:8091".into()
            }
        );
        for bad in ["n1", "=1.2.3.4:1", "n1=1.2.3.4"] {
            assert!(parse_agent(bad).is_err(), "{bad}");
        }
    }
}
