//! Cluster mode's session API: a bridge from `POST/PATCH/DELETE /v1/sessions` to
//! `WhatsappSession` resources in the gateway's namespace. What happens next is what happens after
//! `kubectl apply`: the operator places the session, a shard runs it, a delete goes through the
//! finalizer (logout when `logoutOnDelete`). Reads come from the informer index every gateway
//! already keeps.
//!
//! Only sessions of the gateway's own namespace are managed (and listed), though the informer
//! indexes every namespace for the read API. Writes need an API token: without one the API is
//! open, and an open endpoint that creates and deletes cluster resources is not something to
//! enable by omission.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crds::{WhatsappSession, WhatsappSessionSpec};
use futures::future::BoxFuture;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sha2::Digest;

use super::{Created, Listed, ManageError, ManageResult, SessionManager, SessionSpec};
use crate::informer::{Indexed, InformerLookup};

/// Annotation on resources created through the API.
pub const CREATED_BY_ANNOTATION: &str = "whatsapp.gateway.dev/created-by";

pub struct KubeSessions {
    client: kube::Client,
    namespace: String,
    informer: InformerLookup,
    /// Writes allowed (an API token is configured).
    writable: bool,
}

impl KubeSessions {
    pub fn new(
        client: kube::Client,
        namespace: String,
        informer: InformerLookup,
        writable: bool,
    ) -> Self {
        KubeSessions {
            client,
            namespace,
            informer,
            writable,
        }
    }

    fn api(&self, namespace: &str) -> Api<WhatsappSession> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn check_writable(&self) -> ManageResult<()> {
        if self.writable {
            Ok(())
        } else {
            Err(ManageError::Forbidden(
                "creating, pausing and deleting sessions needs an API token (--api-token / WA_API_TOKEN; chart: api.tokenSecretName)".into(),
            ))
        }
    }

    /// Waits (briefly) for the informer's first list: before it, "not found" would be a guess.
    async fn synced(&self) -> ManageResult<()> {
        tokio::time::timeout(INFORMER_WAIT, self.informer.ready())
            .await
            .map_err(|_| ManageError::Unavailable("the session informer has not synced yet".into()))
    }

    /// The index entry of a session of this namespace (the API manages no other).
    fn indexed(&self, session_id: &str) -> Option<Arc<Indexed>> {
        self.informer
            .entry(session_id)
            .filter(|entry| entry.namespace == self.namespace)
    }

    /// The resource of a session: from the index, or (just created, index not caught up) the
    /// name the API would have given it. `(name, spec, deleting)`.
    async fn locate(&self, session_id: &str) -> ManageResult<(String, SessionSpec, bool)> {
        self.synced().await?;
        if let Some(entry) = self.indexed(session_id) {
            return Ok((entry.name.clone(), entry.spec.clone(), entry.deleting));
        }
        let name = resource_name(session_id);
        match self.api(&self.namespace).get_opt(&name).await {
            Ok(Some(found)) if found.session_id() == session_id => Ok((
                name,
                spec_of(&found),
                found.metadata.deletion_timestamp.is_some(),
            )),
            Ok(_) => Err(ManageError::NotFound),
            Err(err) => Err(from_kube(err)),
        }
    }
}

/// Longest a request waits for the informer's first list after start-up.
const INFORMER_WAIT: Duration = Duration::from_secs(10);

fn spec_of(session: &WhatsappSession) -> SessionSpec {
    SessionSpec {
        session_id: session.session_id(),
        login: (&session.spec.login).into(),
        paused: session.spec.paused,
        logout_on_delete: session.spec.logout_on_delete,
        webhook: session.spec.webhook.clone(),
    }
}

fn from_kube(err: kube::Error) -> ManageError {
    match err {
        kube::Error::Api(status) if status.code == 404 => ManageError::NotFound,
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => {
            ManageError::invalid("spec", status.message.clone())
        }
        kube::Error::Api(status) if status.code == 403 => ManageError::Forbidden(format!(
            "the gateway's service account may not do this: {}",
            status.message
        )),
        other => ManageError::Unavailable(format!("kubernetes: {other}")),
    }
}

/// The resource name for a session id: the id itself when it is a valid name (lowercase DNS
/// subdomain), otherwise a lowercased, cleaned form plus a hash of the id, so ids that differ only
/// in case or punctuation get different resources.
pub fn resource_name(session_id: &str) -> String {
    if is_dns_subdomain(session_id) {
        return session_id.to_owned();
    }
    let mut cleaned: String = session_id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    cleaned.truncate(200);
    let cleaned = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let hash = hex::encode(&sha2::Sha256::digest(session_id.as_bytes())[..6]);
    if cleaned.is_empty() {
        format!("session-{hash}")
    } else {
        format!("{cleaned}-{hash}")
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl SessionManager for KubeSessions {
    fn has_webhook<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, bool> {
        // Any namespace: ids are global, and a status change is for whichever session has it.
        let found = self.informer.entry(session_id);
        Box::pin(async move { found.is_some_and(|entry| entry.spec.webhook.is_some()) })
    }

    fn create(&self, spec: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
        Box::pin(async move {
            self.check_writable()?;
            spec.validate()?;
            self.synced().await?;
            // Session ids are global (they key Redis): one in another namespace is taken.
            if let Some(entry) = self.informer.entry(&spec.session_id)
                && entry.namespace != self.namespace
            {
                tracing::info!(session_id = %spec.session_id, namespace = %entry.namespace, "session id taken in another namespace");
                return Err(ManageError::Conflict);
            }
            if let Some(entry) = self.indexed(&spec.session_id) {
                return if entry.deleting {
                    Err(ManageError::Deleting)
                } else if entry.spec == spec {
                    Ok(Created::Unchanged)
                } else {
                    Err(ManageError::Conflict)
                };
            }
            let name = resource_name(&spec.session_id);
            let mut session = WhatsappSession::new(
                &name,
                WhatsappSessionSpec {
                    session_id: Some(spec.session_id.clone()),
                    login: (&spec.login).into(),
                    paused: spec.paused,
                    logout_on_delete: spec.logout_on_delete,
                    webhook: spec.webhook.clone(),
                },
            );
            session.metadata.annotations = Some(BTreeMap::from([(
                CREATED_BY_ANNOTATION.to_owned(),
                "gateway-api".to_owned(),
            )]));
            let api = self.api(&self.namespace);
            match api.create(&PostParams::default(), &session).await {
                Ok(_) => {
                    tracing::info!(session_id = %spec.session_id, resource = %name, "session resource created");
                    Ok(Created::New)
                }
                // Created a moment ago (the index has not seen it yet), or a resource by that name.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let existing = api.get(&name).await.map_err(from_kube)?;
                    if existing.metadata.deletion_timestamp.is_some() {
                        Err(ManageError::Deleting)
                    } else if spec_of(&existing) == spec {
                        Ok(Created::Unchanged)
                    } else {
                        Err(ManageError::Conflict)
                    }
                }
                Err(err) => Err(from_kube(err)),
            }
        })
    }

    fn set_paused<'a>(
        &'a self,
        session_id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            self.check_writable()?;
            let (name, spec, deleting) = self.locate(session_id).await?;
            if deleting {
                return Err(ManageError::Deleting);
            }
            if spec.paused == paused {
                return Ok(());
            }
            let patch = serde_json::json!({ "spec": { "paused": paused } });
            self.api(&self.namespace)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(from_kube)?;
            tracing::info!(session_id, paused, "session resource patched");
            Ok(())
        })
    }

    fn delete<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            self.check_writable()?;
            let (name, _, deleting) = self.locate(session_id).await?;
            if deleting {
                return Ok(()); // already on its way
            }
            self.api(&self.namespace)
                .delete(&name, &DeleteParams::default())
                .await
                .map_err(from_kube)?;
            tracing::info!(session_id, resource = %name, "session resource deleted");
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
        Box::pin(async move {
            self.synced().await?;
            let mut listed: Vec<Listed> = self
                .informer
                .entries()
                .into_iter()
                .filter(|entry| entry.namespace == self.namespace && !entry.deleting)
                .map(|entry| Listed {
                    spec: entry.spec.clone(),
                    source: "resource",
                    status: Some(entry.view.status.status),
                })
                .collect();
            listed.sort_by(|a, b| a.spec.session_id.cmp(&b.spec.session_id));
            Ok(listed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_kept_and_others_get_a_stable_distinct_name() {
        assert_eq!(resource_name("shop-42"), "shop-42");
        assert_eq!(resource_name("a.b-c"), "a.b-c");
        let upper = resource_name("Shop_42");
        let lower = resource_name("shop_42");
        assert_ne!(upper, lower);
        assert_eq!(upper, resource_name("Shop_42"));
        for id in ["Shop_42", "_x_", "549112233@s.whatsapp.net", "A:b", "-lead"] {
            let name = resource_name(id);
            assert!(is_dns_subdomain(&name), "{id} -> {name}");
        }
        assert!(resource_name("__").starts_with("session-"));
    }
}
