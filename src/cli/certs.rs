//! `chatctl certs init`: a CA, node, router and admin certificates, and
//! caller tokens for one cluster config (see `src/security.rs` for the
//! names certificates carry and what each one may do).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::cluster::ClusterConfig;
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
        let key = KeyPair::generate()?;
        let cert = leaf(names, &node_name(n.id), both.clone())?.signed_by(&key, &ca, &ca_key)?;
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
        )?;
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
