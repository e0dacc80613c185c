//! `whatsapp_gateway_session_api_requests_total{operation,result}`: what the session API was
//! asked and how it answered, whichever mode serves it (a decorator over any
//! [`SessionManager`]).

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{Created, Listed, ManageError, ManageResult, SessionManager, SessionSpec};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    result: &'static str,
}

/// Counts every management call by operation (`create`, `pause`, `resume`, `delete`, `list`) and
/// result (`created`, `unchanged`, `ok`, or the error kind).
pub struct Metered<M> {
    inner: M,
    requests: Family<RequestLabels, Counter>,
}

impl<M: SessionManager> Metered<M> {
    pub fn new(inner: M, registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "whatsapp_gateway_session_api_requests",
            "Session management calls (POST/PATCH/DELETE/GET /v1/sessions) by operation and result",
            requests.clone(),
        );
        Metered { inner, requests }
    }

    fn count<T>(&self, operation: &'static str, result: &ManageResult<T>, ok: &'static str) {
        let result = match result {
            Ok(_) => ok,
            Err(err) => error_kind(err),
        };
        self.requests
            .get_or_create(&RequestLabels { operation, result })
            .inc();
    }
}

fn error_kind(err: &ManageError) -> &'static str {
    match err {
        ManageError::Invalid { .. } => "invalid",
        ManageError::NotFound => "not_found",
        ManageError::Conflict => "conflict",
        ManageError::Deleting => "deleting",
        ManageError::Configured(_) => "configured",
        ManageError::Forbidden(_) => "forbidden",
        ManageError::Unavailable(_) => "unavailable",
    }
}

impl<M: SessionManager> SessionManager for Metered<M> {
    fn has_webhook<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, bool> {
        self.inner.has_webhook(session_id)
    }

    fn create(&self, spec: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
        Box::pin(async move {
            let result = self.inner.create(spec).await;
            let ok = match result {
                Ok(Created::Unchanged) => "unchanged",
                _ => "created",
            };
            self.count("create", &result, ok);
            result
        })
    }

    fn set_paused<'a>(
        &'a self,
        session_id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            let result = self.inner.set_paused(session_id, paused).await;
            self.count(if paused { "pause" } else { "resume" }, &result, "ok");
            result
        })
    }

    fn delete<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            let result = self.inner.delete(session_id).await;
            self.count("delete", &result, "ok");
            result
        })
    }

    fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
        Box::pin(async move {
            let result = self.inner.list().await;
            self.count("list", &result, "ok");
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refuses everything but a list.
    struct Refusing;

    impl SessionManager for Refusing {
        fn create(&self, _: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
            Box::pin(async { Err(ManageError::Conflict) })
        }
        fn set_paused<'a>(&'a self, _: &'a str, _: bool) -> BoxFuture<'a, ManageResult<()>> {
            Box::pin(async { Err(ManageError::NotFound) })
        }
        fn delete<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<()>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    #[tokio::test]
    async fn counts_by_operation_and_result() {
        let mut registry = Registry::default();
        let metered = Metered::new(Refusing, &mut registry);
        let _ = metered.create(SessionSpec::qr("a")).await;
        let _ = metered.set_paused("a", true).await;
        let _ = metered.set_paused("a", false).await;
        let _ = metered.delete("a").await;
        let _ = metered.list().await;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            r#"whatsapp_gateway_session_api_requests_total{operation="create",result="conflict"} 1"#,
            r#"whatsapp_gateway_session_api_requests_total{operation="pause",result="not_found"} 1"#,
            r#"whatsapp_gateway_session_api_requests_total{operation="resume",result="not_found"} 1"#,
            r#"whatsapp_gateway_session_api_requests_total{operation="delete",result="unavailable"} 1"#,
            r#"whatsapp_gateway_session_api_requests_total{operation="list",result="ok"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing in\n{text}");
        }
    }
}
