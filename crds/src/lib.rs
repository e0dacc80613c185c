#![forbid(unsafe_code)]
//! The `WhatsappSession` custom resource and the names (labels, annotations, finalizer, conditions)
//! that the operator and the gateways share.

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "whatsapp.gateway.dev";
/// Label carrying the shard (gateway ordinal) a session is assigned to; gateways watch by it.
pub const SHARD_LABEL: &str = "whatsapp.gateway.dev/shard";
/// Annotation the operator sets to ask shard `<k>` to stop a session and hand it over.
pub const DRAIN_ANNOTATION: &str = "whatsapp.gateway.dev/drain";
/// Annotation the gateway sets once it has stopped a drained session and released its lock.
pub const DRAIN_ACK_ANNOTATION: &str = "whatsapp.gateway.dev/drain-ack";
/// Label on gateway Leases naming the release they belong to (the operator selects by it).
pub const GATEWAY_LEASE_LABEL: &str = "whatsapp.gateway.dev/gateway-of";
/// Annotation a gateway sets on its Lease when it shuts down: hand my sessions over.
pub const DRAINING_ANNOTATION: &str = "whatsapp.gateway.dev/draining";
/// Annotation the owning gateway sets on a deleted session once it logged out and wiped the
/// credentials (value: the gateway pod); the operator then removes the finalizer.
pub const CLEANED_ANNOTATION: &str = "whatsapp.gateway.dev/cleaned";
/// Annotation the operator sets on a resource whose session id another, older resource already
/// names (value: that resource, `namespace/name`). Such a resource is not run, and deleting it
/// neither logs the account out nor wipes its credentials; it follows the older one's shard so
/// the gateway that runs the id sees both.
pub const CONFLICT_ANNOTATION: &str = "whatsapp.gateway.dev/id-conflict";
/// Finalizer that makes deletion log out and wipe credentials first.
pub const FINALIZER: &str = "whatsapp.gateway.dev/cleanup";
/// Field managers for server-side apply, one per writer so each owns its own status fields.
pub const OPERATOR_FIELD_MANAGER: &str = "whatsapp-operator";
pub const GATEWAY_FIELD_MANAGER: &str = "whatsapp-gateway";

/// Condition types written on `status.conditions`.
pub mod condition {
    pub const ASSIGNED: &str = "Assigned";
    pub const AWAITING_SCAN: &str = "AwaitingScan";
    pub const CONNECTED: &str = "Connected";
    pub const READY: &str = "Ready";
    /// Reason of a `False` Assigned condition: another resource names the same session id.
    pub const REASON_SESSION_ID_CONFLICT: &str = "SessionIdConflict";
}

/// One WhatsApp account (one linked device) run by the gateway fleet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "whatsapp.gateway.dev",
    version = "v1alpha1",
    kind = "WhatsappSession",
    namespaced,
    status = "WhatsappSessionStatus",
    shortname = "wasession",
    category = "whatsapp",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Shard", type_ = "string", json_path = ".status.shard"),
    printcolumn(name = "Connected", type_ = "date", json_path = ".status.lastConnectedAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.sessionId) || self.spec.sessionId.size() > 0").message("spec.sessionId must not be empty")
)]
#[x_kube(validation = Rule::new(
    "has(self.sessionId) == has(oldSelf.sessionId) && (!has(self.sessionId) || self.sessionId == oldSelf.sessionId)"
).message("spec.sessionId is immutable").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct WhatsappSessionSpec {
    /// Stable id of the session in the backend and in Redis keys; defaults to metadata.name. Immutable.
    /// Unique across the cluster: a resource naming an id that an older resource already names is
    /// not run (phase Failed, reason SessionIdConflict), and deleting it leaves the account alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"))]
    pub session_id: Option<String>,
    /// How the account is linked.
    #[serde(default)]
    pub login: Login,
    /// Stop the session without losing its credentials.
    #[serde(default)]
    pub paused: bool,
    /// Log the device out and wipe its credentials when the resource is deleted (a paused session
    /// is connected just long enough to unlink it).
    #[serde(default = "default_true")]
    pub logout_on_delete: bool,
    /// Per-session backend: this session's batches go to `url` (the batch paths appended),
    /// signed with the key in `secretRef` (a Secret in the session's namespace), instead of to
    /// the gateways' configured backend. The session does not start until the Secret resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

fn default_true() -> bool {
    true
}

// Not derived: `logoutOnDelete` defaults to true in Rust as in the schema.
impl Default for WhatsappSessionSpec {
    fn default() -> Self {
        WhatsappSessionSpec {
            session_id: None,
            login: Login::default(),
            paused: false,
            logout_on_delete: true,
            webhook: None,
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[x_kube(validation = Rule::new(
    "self.method != 'pairingCode' || has(self.phoneNumber)"
).message("login.phoneNumber is required when login.method is pairingCode").reason(Reason::FieldValueRequired))]
#[serde(rename_all = "camelCase")]
pub struct Login {
    #[serde(default)]
    pub method: LoginMethod,
    /// International number, digits only with an optional leading `+` (E.164), for `pairingCode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\+?[1-9][0-9]{7,14}$"))]
    pub phone_number: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LoginMethod {
    #[default]
    Qr,
    PairingCode,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Base URL of the backend for this session (the batch paths are appended).
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+([/?#]\S*)?$"))]
    pub url: String,
    /// Secret holding the HMAC key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// A Secret in the session's namespace.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub name: String,
    /// The key in the Secret's data holding the HMAC key.
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]{1,253}$"))]
    pub key: String,
}

impl SecretKeyRef {
    /// The schema's rules, for specs that do not pass through the apiserver (standalone): they
    /// also keep a name from escaping the directory standalone reads Secrets from.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 253
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !self.name.starts_with(['-', '.'])
            && !self.name.ends_with(['-', '.']);
        if !name_ok {
            return Err(format!(
                "name `{}` is not a Secret name (lowercase letters, digits, - and .)",
                self.name
            ));
        }
        let key_ok = !self.key.is_empty()
            && self.key.len() <= 253
            && self
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && self.key != "."
            && self.key != "..";
        if !key_ok {
            return Err(format!(
                "key `{}` is not a Secret key (letters, digits, -, _ and .)",
                self.key
            ));
        }
        Ok(())
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Pending,
    Assigned,
    Connecting,
    AwaitingScan,
    Connected,
    Disconnected,
    LoggedOut,
    Failed,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WhatsappSessionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_pod: Option<String>,
    /// Keyed by `type`, so each server-side-apply field manager owns its own conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Expiry and rotation count of the current QR code; never the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr: Option<QrStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connected_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_disconnect_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub me: Option<Me>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QrStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub rotations: u32,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jid: Option<String>,
}

/// A Kubernetes-style condition.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Redis key pattern of everything stored for a session (credentials, lock, cache entries); the
/// hash tag keeps one session's keys on one Redis Cluster slot.
pub fn session_key_pattern(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:*")
}

impl WhatsappSession {
    /// The session id used in Redis keys and backend payloads: `spec.sessionId` or the resource name.
    pub fn session_id(&self) -> String {
        self.spec
            .session_id
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}

/// The CRD as YAML, exactly as checked in at `crds/whatsappsession.yaml`.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&WhatsappSession::crd()).expect("CRD serializes to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_yaml_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/whatsappsession.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "crds/whatsappsession.yaml is stale: run `scripts/gen.sh`"
        );
    }

    #[test]
    fn chart_crd_copy_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/whatsapp-gateway/crds/whatsappsession.yaml"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "charts/whatsapp-gateway/crds/whatsappsession.yaml is stale: run `scripts/gen.sh`"
        );
    }

    #[test]
    fn rust_defaults_match_schema_defaults() {
        let spec: WhatsappSessionSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, WhatsappSessionSpec::default());
        assert!(spec.logout_on_delete);
    }

    #[test]
    fn session_id_defaults_to_name() {
        let mut s = WhatsappSession::new("alice", WhatsappSessionSpec::default());
        assert_eq!(s.session_id(), "alice");
        s.spec.session_id = Some("acct-1".into());
        assert_eq!(s.session_id(), "acct-1");
    }

    #[test]
    fn crd_carries_names_columns_and_rules() {
        let crd = WhatsappSession::crd();
        assert_eq!(
            crd.spec.names.short_names,
            Some(vec!["wasession".to_string()])
        );
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["whatsapp".to_string()])
        );
        let yaml = crd_yaml();
        for needle in [
            "spec.sessionId is immutable",
            "login.phoneNumber is required",
            "Phase",
            "Shard",
            "Connected",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle}");
        }
    }
}
