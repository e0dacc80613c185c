//! Resolves a session's `spec.webhook` into a [`WebhookTarget`]: the URL checked, the HMAC key
//! read from the Secret it names. In cluster mode the Secret lives in the session's namespace;
//! standalone reads a directory laid out as a mounted Secret (`<dir>/<name>/<key>`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tokio::time::Instant;

use crate::delivery::{WebhookTarget, Webhooks};

/// A Secret read is reused this long (a rotated key takes effect within it).
pub const SECRET_TTL: Duration = Duration::from_secs(60);
/// A failed read is retried after this long (and logged once per attempt, not per reconcile).
pub const SECRET_RETRY: Duration = Duration::from_secs(10);

enum Source {
    Kube(kube::Client),
    Dir(PathBuf),
    /// Standalone without `--secrets-dir`: a `secretRef` cannot be resolved.
    Nowhere,
}

type Entry = (Instant, Result<BTreeMap<String, String>, String>);

pub struct WebhookResolver {
    source: Source,
    cache: Mutex<HashMap<(String, String), Entry>>,
}

impl WebhookResolver {
    pub fn kube(client: kube::Client) -> Self {
        Self::with(Source::Kube(client))
    }

    /// `dir`: where standalone finds `secretRef`s (`<dir>/<name>/<key>`); None refuses them.
    pub fn dir(dir: Option<PathBuf>) -> Self {
        Self::with(dir.map(Source::Dir).unwrap_or(Source::Nowhere))
    }

    fn with(source: Source) -> Self {
        WebhookResolver {
            source,
            cache: Mutex::default(),
        }
    }

    /// The target of `webhook` for a session in `namespace`; the error says what is missing.
    pub async fn resolve(
        &self,
        namespace: &str,
        webhook: &crds::Webhook,
    ) -> Result<WebhookTarget, String> {
        let url = WebhookTarget::parse_url(&webhook.url).map_err(|e| format!("webhook.url {e}"))?;
        let secret = match &webhook.secret_ref {
            None => None,
            Some(reference) => {
                reference
                    .validate()
                    .map_err(|e| format!("webhook.secretRef: {e}"))?;
                let data = self.secret(namespace, &reference.name).await?;
                let value = data.get(&reference.key).ok_or_else(|| {
                    format!(
                        "webhook.secretRef: Secret `{}` has no key `{}`",
                        reference.name, reference.key
                    )
                })?;
                // As for the backend secret: a Secret made from a file ends in a newline.
                let value = value.trim();
                if value.is_empty() {
                    return Err(format!(
                        "webhook.secretRef: key `{}` of Secret `{}` is empty",
                        reference.key, reference.name
                    ));
                }
                Some(value.to_owned())
            }
        };
        Ok(WebhookTarget { url, secret })
    }

    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let key = (namespace.to_owned(), name.to_owned());
        let now = Instant::now();
        if let Some((at, cached)) = self.cache.lock().expect("secret cache").get(&key) {
            let ttl = if cached.is_ok() {
                SECRET_TTL
            } else {
                SECRET_RETRY
            };
            if now.duration_since(*at) < ttl {
                return cached.clone();
            }
        }
        let read = self.read(namespace, name).await;
        if let Err(err) = &read {
            tracing::warn!(namespace, secret = name, error = %err, "webhook secret unavailable; sessions naming it wait");
        }
        self.cache
            .lock()
            .expect("secret cache")
            .insert(key, (now, read.clone()));
        read
    }

    async fn read(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
        match &self.source {
            Source::Kube(client) => {
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                let secret = api
                    .get(name)
                    .await
                    .map_err(|e| format!("webhook.secretRef: Secret `{namespace}/{name}`: {e}"))?;
                let mut data = BTreeMap::new();
                for (key, value) in secret.data.unwrap_or_default() {
                    if let Ok(text) = String::from_utf8(value.0) {
                        data.insert(key, text);
                    }
                }
                for (key, value) in secret.string_data.unwrap_or_default() {
                    data.insert(key, value);
                }
                Ok(data)
            }
            Source::Dir(dir) => {
                let path = dir.join(name);
                let mut data = BTreeMap::new();
                let entries = std::fs::read_dir(&path)
                    .map_err(|e| format!("webhook.secretRef: {}: {e}", path.display()))?;
                for entry in entries.flatten() {
                    let file = entry.path();
                    if file.is_file()
                        && let (Some(key), Ok(value)) = (
                            file.file_name().and_then(|n| n.to_str()),
                            std::fs::read_to_string(&file),
                        )
                    {
                        data.insert(key.to_owned(), value);
                    }
                }
                Ok(data)
            }
            Source::Nowhere => Err(format!(
                "webhook.secretRef `{name}` needs --secrets-dir / WA_SECRETS_DIR in standalone mode"
            )),
        }
    }
}

/// Where each session's batches go (`spec.webhook`), and how its Secret is read: what the
/// session layers (the shard in cluster mode, the session book in standalone) hold.
pub struct WebhookRouting {
    pub webhooks: Arc<Webhooks>,
    pub resolver: WebhookResolver,
    /// Sessions waiting for their webhook, with the reason last logged: each reason is logged
    /// once (at warn), not at every reconcile.
    waiting: Mutex<HashMap<String, String>>,
}

impl WebhookRouting {
    pub fn new(webhooks: Arc<Webhooks>, resolver: WebhookResolver) -> Self {
        WebhookRouting {
            webhooks,
            resolver,
            waiting: Mutex::default(),
        }
    }

    /// Forgets a session that no longer runs here.
    pub fn forget(&self, id: &str) {
        self.webhooks.removed(id);
        self.waiting.lock().expect("waiting").remove(id);
    }

    /// Points the session's batches at its webhook (or the gateway's backend). False when its
    /// webhook cannot be resolved yet and it has no route: it must not start, since its events
    /// would otherwise reach a backend it did not name.
    pub async fn route(&self, id: &str, namespace: &str, webhook: Option<&crds::Webhook>) -> bool {
        let target = match webhook {
            None => None,
            Some(webhook) => match self.resolver.resolve(namespace, webhook).await {
                Ok(target) => Some(target),
                // Running already with its previous target: keep it until the new one resolves.
                Err(_) if self.webhooks.keep_route(id) => return true,
                Err(err) => {
                    let mut waiting = self.waiting.lock().expect("waiting");
                    if waiting.get(id) != Some(&err) {
                        // A bad URL or a missing key is the user's to fix: say which, once.
                        tracing::warn!(session_id = %id, namespace, %err, "session waits for its webhook");
                        waiting.insert(id.to_owned(), err);
                    }
                    drop(waiting);
                    self.webhooks.hold(id);
                    return false;
                }
            },
        };
        if self.waiting.lock().expect("waiting").remove(id).is_some() {
            tracing::info!(session_id = %id, "webhook resolved; the session may start");
        }
        match self.webhooks.route(id, target.as_ref()).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(session_id = %id, %err, "could not open the session's webhook");
                if self.webhooks.keep_route(id) {
                    true
                } else {
                    self.webhooks.hold(id);
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(url: &str, secret: Option<(&str, &str)>) -> crds::Webhook {
        crds::Webhook {
            url: url.into(),
            secret_ref: secret.map(|(name, key)| crds::SecretKeyRef {
                name: name.into(),
                key: key.into(),
            }),
        }
    }

    #[tokio::test]
    async fn a_directory_resolves_secret_refs_like_a_mounted_secret() {
        let dir = std::env::temp_dir().join(format!("wa-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("shop")).unwrap();
        std::fs::write(dir.join("shop/hmac"), "k3y\n").unwrap();
        let resolver = WebhookResolver::dir(Some(dir.clone()));
        let target = resolver
            .resolve(
                "",
                &webhook("https://shop.example/api", Some(("shop", "hmac"))),
            )
            .await
            .unwrap();
        assert_eq!(target.url.as_str(), "https://shop.example/api");
        assert_eq!(
            target.secret.as_deref(),
            Some("k3y"),
            "trimmed like the backend secret"
        );

        let missing_key = resolver
            .resolve(
                "",
                &webhook("https://shop.example/api", Some(("shop", "other"))),
            )
            .await
            .unwrap_err();
        assert!(missing_key.contains("no key `other`"), "{missing_key}");
        let missing_secret = resolver
            .resolve(
                "",
                &webhook("https://shop.example/api", Some(("nope", "hmac"))),
            )
            .await
            .unwrap_err();
        assert!(
            missing_secret.contains("webhook.secretRef"),
            "{missing_secret}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_a_directory_only_unsigned_webhooks_resolve() {
        let resolver = WebhookResolver::dir(None);
        let target = resolver
            .resolve("", &webhook("http://127.0.0.1:9/hook", None))
            .await
            .unwrap();
        assert_eq!(target.secret, None);
        let err = resolver
            .resolve("", &webhook("http://127.0.0.1:9/hook", Some(("s", "k"))))
            .await
            .unwrap_err();
        assert!(err.contains("--secrets-dir"), "{err}");
        let err = resolver
            .resolve("", &webhook("ftp://example", None))
            .await
            .unwrap_err();
        assert!(err.starts_with("webhook.url"), "{err}");
    }
}
