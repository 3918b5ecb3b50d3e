//! `chatctl certs init`: a CA, node, router and admin certificates, and
//! caller tokens for one cluster config (see `src/security.rs` for the
//! names certificates carry and what each one may do). `chatctl certs node`:
//! a certificate for a node added to the config later, signed with the
//! same CA.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::cluster::{ClusterConfig, NodeConfig};
use crate::security::{node_name, ADMIN_NAME, ANY_NODE_NAME, ROUTER_NAME};

/// How long the certificates are valid, in years.
const VALID_YEARS: i32 = 5;

/// The host part of `host:port` (IPv6 in brackets included), unless it is a
/// wildcard address, which is no name to verify.
fn host_of(addr: &str) -> Option<String> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    match host {
        "" | "0.0.0.0" | "::" => None,
        h => Some(h.to_string()),
    }
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Calendar years, close enough for a validity window.
    let year = 1970 + (now / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

fn leaf(
    names: Vec<String>,
    common_name: &str,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(names).context("certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages;
    validity(&mut params);
    Ok(params)
}

/// Writes a file that must not exist unless `force`; keys and tokens are
/// readable by their owner only.
fn write(path: &Path, text: &str, secret: bool, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!(
            "{} exists; pass --force to replace it (every node and client then needs the new \
             files)",
            path.display()
        );
    }
    let mut options = std::fs::OpenOptions::new();
    // A new file only, unless forced (no race with a file made meanwhile).
    options.write(true).truncate(true);
    match force {
        true => options.create(true),
        false => options.create_new(true),
    };
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    if secret {
        // A file replaced with --force keeps its old mode otherwise.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Writes `node-<id>.pem` and `.key` for node `n` into `out`, signed by
/// `ca`: its node name, the name every node carries, and the hosts of its
/// addresses.
fn node_certificate(
    n: &NodeConfig,
    (ca, ca_key): (&rcgen::Certificate, &KeyPair),
    out: &Path,
    force: bool,
) -> anyhow::Result<()> {
    let mut names = vec![node_name(n.id), ANY_NODE_NAME.to_string()];
    for addr in [Some(n.raft_addr.as_str()), n.advertise_addr.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Some(h) = host_of(addr) {
            if !names.contains(&h) {
                names.push(h);
            }
        }
    }
    let usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = leaf(names, &node_name(n.id), usages)?.signed_by(&key, ca, ca_key)?;
    write(
        &out.join(format!("node-{}.pem", n.id)),
        &cert.pem(),
        false,
        force,
    )?;
    write(
        &out.join(format!("node-{}.key", n.id)),
        &key.serialize_pem(),
        true,
        force,
    )
}

/// `chatctl certs node`: a certificate for node `id` of `config` (one added
/// after `certs init`), signed with the CA in `ca_dir` (its `ca.pem` and
/// `ca.key`), written into `out`.
pub fn node(config: &Path, ca_dir: &Path, id: u64, out: &Path, force: bool) -> anyhow::Result<i32> {
    let cluster = ClusterConfig::load(config)?;
    let Some(n) = cluster.nodes.iter().find(|n| n.id == id) else {
        anyhow::bail!(
            "node {id} is not in {}; add its [[nodes]] entry first",
            config.display()
        );
    };
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?).context("ca.key")?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read("ca.pem")?).context("ca.pem")?;
    // The same subject and key as the CA: what a certificate it signs names
    // as its issuer and is checked against.
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    node_certificate(n, (&ca, &ca_key), out, force)?;
    println!(
        "wrote node-{id}.pem and node-{id}.key to {}, signed by {}; copy them to node {id}'s \
         host with ca.pem and the token files",
        out.display(),
        ca_dir.join("ca.pem").display()
    );
    Ok(0)
}

fn token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn init(
    config: &Path,
    out: &Path,
    router_names: &[String],
    force: bool,
) -> anyhow::Result<i32> {
    let cluster = ClusterConfig::load(config)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("chatstore CA for {}", cluster.cluster_name),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca = ca_params.self_signed(&ca_key)?;
    write(&out.join("ca.pem"), &ca.pem(), false, force)?;
    write(&out.join("ca.key"), &ca_key.serialize_pem(), true, force)?;

    let both = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    for n in &cluster.nodes {
        node_certificate(n, (&ca, &ca_key), out, force)?;
    }

    let mut names = vec![ROUTER_NAME.to_string(), "localhost".to_string()];
    for r in &cluster.routers {
        if let Some(h) = host_of(&r.listen) {
            names.push(h);
        }
    }
    names.extend(router_names.iter().cloned());
    names.sort();
    names.dedup();
    let key = KeyPair::generate()?;
    let cert = leaf(names, ROUTER_NAME, both)?.signed_by(&key, &ca, &ca_key)?;
    write(&out.join("router.pem"), &cert.pem(), false, force)?;
    write(&out.join("router.key"), &key.serialize_pem(), true, force)?;

    let key = KeyPair::generate()?;
    let cert = leaf(
        vec![ADMIN_NAME.to_string()],
        ADMIN_NAME,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?
    .signed_by(&key, &ca, &ca_key)?;
    write(&out.join("admin.pem"), &cert.pem(), false, force)?;
    write(&out.join("admin.key"), &key.serialize_pem(), true, force)?;

    write(
        &out.join("service.tokens"),
        &format!(
            "# Bearer tokens for frontend services (public API). One per line.\n{}\n",
            token()
        ),
        true,
        force,
    )?;
    write(
        &out.join("admin.tokens"),
        &format!(
            "# Bearer tokens for operators (admin calls, moderation). One per line.\n{}\n",
            token()
        ),
        true,
        force,
    )?;

    let dir = out.display();
    println!(
        "wrote a CA, {} node certificates, a router and an admin certificate, and tokens to {dir}",
        cluster.nodes.len()
    );
    println!();
    println!(
        "Add to {} (paths may also be relative to the config's folder):",
        config.display()
    );
    println!();
    if cluster.read_token_secret.is_none() {
        println!("# at the top, before any [table]: the key read tokens are signed with,");
        println!("# the same on every node and router");
        println!("read_token_secret = \"{}\"", token());
        println!();
    }
    println!("[tls]");
    println!("ca = \"{dir}/ca.pem\"");
    println!("node_cert = \"{dir}/node-{{id}}.pem\"");
    println!("node_key = \"{dir}/node-{{id}}.key\"");
    println!("router_cert = \"{dir}/router.pem\"");
    println!("router_key = \"{dir}/router.key\"");
    println!();
    println!("[auth]");
    println!("service_tokens = \"{dir}/service.tokens\"");
    println!("admin_tokens = \"{dir}/admin.tokens\"");
    println!();
    println!("Each node host needs ca.pem, its node-<id>.pem/.key and both token files;");
    println!("each router host ca.pem, router.pem/.key and both token files. Keep ca.key offline.");
    println!("chatctl for operators:");
    println!("  export CHATSTORE_CA={dir}/ca.pem CHATSTORE_CERT={dir}/admin.pem \\");
    println!("         CHATSTORE_KEY={dir}/admin.key CHATSTORE_TOKEN_FILE={dir}/admin.tokens");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    /// A node certificate made later with `certs node` chains to the CA
    /// `certs init` made, under the node's name.
    #[test]
    fn a_node_added_later_gets_a_certificate_from_the_same_ca() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let config = |nodes: u64| {
            let mut text = String::from(
                "cluster_name = \"t\"\nshards = 4\nreplication_factor = 1\nregions = [\"eu\"]\n\
                 read_token_secret = \"0123456789abcdef0123456789abcdef\"\n",
            );
            for id in 1..=nodes {
                text.push_str(&format!(
                    "[[nodes]]\nid = {id}\nregion = \"eu\"\nraft_addr = \"127.0.0.1:{}\"\n\
                     data_dir = \"d{id}\"\nbootstrap = true\n",
                    7100 + id
                ));
            }
            let path = dir.path().join(format!("c{nodes}.toml"));
            std::fs::write(&path, text).unwrap();
            path
        };
        let (first, certs, later) = (config(1), dir.path().join("certs"), dir.path().join("n2"));
        super::init(&first, &certs, &[], false).unwrap();
        let err = super::node(&first, &certs, 2, &later, false).unwrap_err();
        assert!(err.to_string().contains("not in"), "{err}");
        super::node(&config(2), &certs, 2, &later, false).unwrap();

        let ca = CertificateDer::from_pem_file(certs.join("ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_file(later.join("node-2.pem")).unwrap();
        let name = ServerName::try_from(crate::security::node_name(2)).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .expect("node 2's certificate chains to the cluster CA");
        // A second run does not replace the files unless forced.
        assert!(super::node(&config(2), &certs, 2, &later, false).is_err());
        super::node(&config(2), &certs, 2, &later, true).unwrap();
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7101").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            host_of("node1.eu.internal:7100").as_deref(),
            Some("node1.eu.internal")
        );
        assert_eq!(host_of("[::1]:7100").as_deref(), Some("::1"));
        assert_eq!(host_of("0.0.0.0:7100"), None);
    }
}
