//! `--sessions-file`: standalone sessions from the same `WhatsappSession` manifests that
//! `kubectl apply` takes (one or more YAML documents), so a file moves between modes unchanged.

use std::path::Path;

use crds::WhatsappSession;

use super::{LoginSpec, SessionSpec};

/// Reads every `WhatsappSession` in `path`. The error names the document and what is wrong.
pub fn load(path: &Path) -> Result<Vec<SessionSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<SessionSpec>, String> {
    use serde::Deserialize;
    let mut specs: Vec<SessionSpec> = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| format!("document {doc}: not YAML: {e}"))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "WhatsappSession" {
            return Err(format!(
                "document {doc}: kind `{kind}`, expected WhatsappSession"
            ));
        }
        let session: WhatsappSession = serde_yaml::from_value(value)
            .map_err(|e| format!("document {doc}: not a WhatsappSession: {e}"))?;
        let spec = SessionSpec {
            session_id: session.session_id(),
            login: LoginSpec::from(&session.spec.login),
            paused: session.spec.paused,
            logout_on_delete: session.spec.logout_on_delete,
            webhook: session.spec.webhook.clone(),
        };
        spec.validate()
            .map_err(|e| format!("document {doc} ({}): {e}", spec.session_id))?;
        if specs.iter().any(|s| s.session_id == spec.session_id) {
            return Err(format!(
                "document {doc}: session `{}` appears twice",
                spec.session_id
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_examples_kubectl_applies() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let specs = load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!specs.is_empty(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn takes_several_documents_with_defaults_and_overrides() {
        let specs = parse(
            "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata: {name: shop-42}\nspec: {}\n---\n\
             apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata: {name: support}\n\
             spec: {sessionId: Support_7, paused: true, logoutOnDelete: false, login: {method: pairingCode, phoneNumber: '+5491122334455'}}\n---\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0], SessionSpec::qr("shop-42"));
        assert_eq!(specs[1].session_id, "Support_7");
        assert!(specs[1].paused && !specs[1].logout_on_delete);
        assert_eq!(specs[1].login.method, crds::LoginMethod::PairingCode);
    }

    #[test]
    fn names_the_bad_document() {
        let header = "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\n";
        let err = parse(&format!(
            "{header}metadata: {{name: a}}\nspec: {{}}\n---\n{header}metadata: {{name: b}}\nspec: {{login: {{method: pairingCode}}}}\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("document 2") && err.contains("login.phoneNumber"),
            "{err}"
        );
        let err = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err();
        assert!(
            err.contains("document 1") && err.contains("ConfigMap"),
            "{err}"
        );
        let err = parse(&format!(
            "{header}metadata: {{name: a}}\nspec: {{}}\n---\n{header}metadata: {{name: a}}\nspec: {{}}\n"
        ))
        .unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = parse(&format!(
            "{header}metadata: {{name: a}}\nspec: {{paused: maybe}}\n"
        ))
        .unwrap_err();
        assert!(err.contains("document 1"), "{err}");
    }
}
