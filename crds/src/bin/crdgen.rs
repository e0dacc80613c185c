#![forbid(unsafe_code)]
//! Prints the WhatsappSession CRD as YAML (`cargo run -p crds --bin crdgen > crds/whatsappsession.yaml`).
fn main() {
    print!("{}", crds::crd_yaml());
}
