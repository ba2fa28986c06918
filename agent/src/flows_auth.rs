//! Who may read flows (docs/security.md, "Who reads flows").
//!
//! * The local socket (`--flows-socket`, mode 0600): root on the node, who can read the maps
//!   anyway. No further check.
//! * The network port (`--grpc-addr`): TLS with the node certificate, and a bearer token in the
//!   `authorization` metadata, reviewed through the Kubernetes API — a TokenReview (the
//!   apiserver's own audiences), then a SubjectAccessReview of that user for `get` on
//!   `flows.mesh.cortexflow.io`, in the namespace the request filters on (cluster-wide when it
//!   filters on none). So RBAC decides who reads flows, as for any Kubernetes resource. An agent
//!   without access to the API refuses every network caller (`UNAVAILABLE`): fail closed.
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::api::{Api, PostParams};
use tonic::Status;

/// The API group and resource of the flows permission.
pub const FLOWS_GROUP: &str = "mesh.cortexflow.io";
pub const FLOWS_RESOURCE: &str = "flows";

/// How a `Flows.Observe` caller is authorized.
#[derive(Clone)]
pub enum FlowsAccess {
    /// The node-local socket.
    Local,
    /// Token and RBAC through the Kubernetes API.
    Kubernetes(kube::Client),
    /// No Kubernetes API: network callers are refused, with the reason.
    Unavailable(String),
}

impl FlowsAccess {
    /// Whether the caller of a request with `metadata`, filtering on `namespace`, may read.
    pub async fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        namespace: &str,
    ) -> Result<(), Status> {
        let client = match self {
            FlowsAccess::Local => return Ok(()),
            FlowsAccess::Unavailable(why) => {
                return Err(Status::unavailable(format!(
                    "flows over the network need the Kubernetes API to authorize callers ({why}); use the node's local socket"
                )));
            }
            FlowsAccess::Kubernetes(c) => c,
        };
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "Flows.Observe needs a bearer token (authorization: Bearer …)",
                )
            })?;
        let review = Api::<TokenReview>::all(client.clone())
            .create(
                &PostParams::default(),
                &TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_string(),
                        audiences: None,
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let st = review.status.unwrap_or_default();
        if st.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the token does not authenticate: {}",
                st.error.unwrap_or_default()
            )));
        }
        let user = st.user.unwrap_or_default();
        let name = user.username.clone().unwrap_or_default();
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("get".into()),
                    group: Some(FLOWS_GROUP.into()),
                    resource: Some(FLOWS_RESOURCE.into()),
                    namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| Status::unavailable(format!("SubjectAccessReview failed: {e}")))?;
        let st = r.status.unwrap_or_default();
        if !st.allowed {
            let scope = if namespace.is_empty() {
                "in every namespace".to_string()
            } else {
                format!("in namespace {namespace}")
            };
            return Err(Status::permission_denied(format!(
                "{name} may not get {FLOWS_RESOURCE}.{FLOWS_GROUP} {scope}{}",
                st.reason.map(|r| format!(": {r}")).unwrap_or_default()
            )));
        }
        Ok(())
    }
}
