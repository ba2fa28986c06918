//! What one node's config stream sends next: everything in its first message, then only the
//! sections that changed since what it sent (the ipcache as a delta while the change log reaches
//! back far enough). Pure: the gRPC layer calls [`Engine::next_config`] with the stream's
//! [`Cursor`] whenever the engine version moved and the agent can take a message, so a burst of
//! changes becomes one message and a slow agent skips versions instead of queueing them.
use cortexflow_domain::{Endpoints, NodeConfig, NodeInfo};

use crate::Engine;

/// What a stream already sent, section by section (the engine version of each).
#[derive(Clone, Debug, Default)]
pub struct Cursor {
    started: bool,
    info: u64,
    endpoints: u64,
    ipcache: u64,
    services: u64,
    identities: u64,
}

impl Engine {
    /// The next message for `node`'s stream, versioned `wire_version`: everything when the
    /// cursor is new, then only the sections that changed since it; `None` when nothing did.
    pub fn next_config(
        &self,
        node: &str,
        sent: &mut Cursor,
        wire_version: u64,
    ) -> Option<NodeConfig> {
        let first = !sent.started;
        let mut msg = NodeConfig {
            version: wire_version,
            full: first,
            ..Default::default()
        };
        let st = self.node(node);
        let (info, info_v) = match st {
            Some(s) => ((*s.info).clone(), s.info_version),
            None => (
                NodeInfo {
                    name: node.to_string(),
                    ..Default::default()
                },
                0,
            ),
        };
        if first || info_v > sent.info {
            msg.node = Some(info);
            sent.info = info_v;
        }
        let (eps, eps_v) = match st {
            Some(s) => ((*s.endpoints).clone(), s.endpoints_version),
            None => (Endpoints::default(), 0),
        };
        if first || eps_v > sent.endpoints {
            msg.endpoints = Some(eps);
            sent.endpoints = eps_v;
        }
        let (_, ipv) = self.ipcache();
        if first {
            msg.ipcache = Some(self.ipcache_full());
            sent.ipcache = ipv;
        } else if ipv > sent.ipcache {
            msg.ipcache = Some(
                self.ipcache_since(sent.ipcache)
                    .unwrap_or_else(|| self.ipcache_full()),
            );
            sent.ipcache = ipv;
        }
        let (svcs, sv) = self.services();
        if first || sv > sent.services {
            msg.services = Some((*svcs).clone());
            sent.services = sv;
        }
        let (ids, iv) = self.identities();
        if first || iv > sent.identities {
            msg.identities = Some((*ids).clone());
            sent.identities = iv;
        }
        sent.started = true;
        let any = msg.node.is_some()
            || msg.endpoints.is_some()
            || msg.ipcache.is_some()
            || msg.services.is_some()
            || msg.identities.is_some();
        any.then_some(msg)
    }
}
