//! Who may talk to whom: TLS identities and caller tokens.
//!
//! Every certificate is signed by the cluster CA and names its role in a
//! DNS subject alternative name:
//! - `node-<id>.chatstore` and `node.chatstore`: node `<id>`;
//! - `router.chatstore`: a router (server for the public API, client of
//!   nodes);
//! - `admin.chatstore`: an operator's chatctl (client of nodes).
//!
//! Nodes require a client certificate from the CA on every connection (mutual
//! TLS). The Raft transport further requires the certificate of the node the
//! request claims to come from, and that node must be a member of the shard.
//! Callers authenticate with bearer tokens (`authorization: Bearer <token>`):
//! service tokens for the public API, admin tokens for admin calls and chat
//! moderation. Tokens are compared in constant time (over their SHA-256, so
//! not even the length leaks) and never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::cluster::ClusterConfig;

pub mod tls;

pub use tls::{ClientAuth, Identity, Tls};

/// The DNS name in node `id`'s certificate.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.chatstore")
}
/// The DNS name in every node certificate, for clients that do not know
/// which node an address belongs to (chatctl).
pub const ANY_NODE_NAME: &str = "node.chatstore";
pub const ROUTER_NAME: &str = "router.chatstore";
pub const ADMIN_NAME: &str = "admin.chatstore";

fn node_path(config: &ClusterConfig, pattern: &str, id: u64) -> std::path::PathBuf {
    config.resolve(Path::new(&pattern.replace("{id}", &id.to_string())))
}

impl Tls {
    /// Node `id`'s TLS, if the config has `[tls]`.
    pub fn for_node(config: &ClusterConfig, id: u64) -> anyhow::Result<Option<Tls>> {
        let Some(t) = &config.tls else {
            return Ok(None);
        };
        Tls::load(
            config.resolve(&t.ca),
            Some(Identity {
                cert: node_path(config, &t.node_cert, id),
                key: node_path(config, &t.node_key, id),
                names: Some(vec![node_name(id), ANY_NODE_NAME.to_string()]),
            }),
        )
        .map(Some)
    }

    /// A router's TLS, if the config has `[tls]`.
    pub fn for_router(config: &ClusterConfig) -> anyhow::Result<Option<Tls>> {
        let Some(t) = &config.tls else {
            return Ok(None);
        };
        Tls::load(
            config.resolve(&t.ca),
            Some(Identity {
                cert: config.resolve(&t.router_cert),
                key: config.resolve(&t.router_key),
                names: Some(vec![ROUTER_NAME.to_string()]),
            }),
        )
        .map(Some)
    }

    /// chatctl's TLS from its own files (CA, and a client certificate for
    /// nodes).
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Tls> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some(Identity {
                cert: c.to_path_buf(),
                key: k.to_path_buf(),
                names: None,
            }),
            (None, None) => None,
            _ => anyhow::bail!("--cert and --key go together"),
        };
        Tls::load(ca.to_path_buf(), identity)
    }
}

/// A client endpoint for `addr`. Its scheme is `http` with or without TLS:
/// [`channel`] and [`connect`] add the TLS.
pub fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    Endpoint::from_shared(format!("http://{addr}")).with_context(|| format!("bad address {addr:?}"))
}

/// A channel through `endpoint` that connects when first used, over TLS to
/// a server whose certificate names `server_name` if `tls` is given.
pub fn channel(
    endpoint: Endpoint,
    tls: Option<&Tls>,
    server_name: &str,
) -> anyhow::Result<Channel> {
    Ok(match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector(server_name)?),
        None => endpoint.connect_lazy(),
    })
}

/// Like [`channel`], but connects now.
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&Tls>,
    server_name: &str,
) -> anyhow::Result<Channel> {
    Ok(match tls {
        Some(tls) => {
            endpoint
                .connect_with_connector(tls.connector(server_name)?)
                .await?
        }
        None => endpoint.connect().await?,
    })
}

/// Whether the peer's certificate chain (already verified against the CA
/// by TLS) names `name`.
pub fn peer_is(certs: &[tonic::transport::CertificateDer<'static>], name: &str) -> bool {
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// Calls `reload` every [`FILES_CHECKED_EVERY`] until it returns `None`
/// (what it reloads is gone). Logs each change, and the first failure of
/// a run of them: `what` and then `changed` or `kept`.
pub(crate) fn watch_files(
    what: &'static str,
    changed: &'static str,
    kept: &'static str,
    mut reload: impl FnMut() -> Option<anyhow::Result<bool>> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(FILES_CHECKED_EVERY).await;
            match reload() {
                None => return,
                Some(Ok(change)) => {
                    if change {
                        tracing::info!("{what} changed; {changed}");
                    }
                    failing = false;
                }
                Some(Err(e)) if !failing => {
                    tracing::warn!(error = %format!("{e:#}"), "{what} not reloaded; {kept}");
                    failing = true;
                }
                Some(Err(_)) => {}
            }
        }
    });
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The public API: any service or admin token.
    Service,
    /// Admin calls and moderation: an admin token.
    Admin,
}

/// The tokens a process accepts, as SHA-256 digests. Clones share them;
/// [`Tokens::watch`] re-reads the token files while the process runs.
#[derive(Clone, Default)]
pub struct Tokens {
    sets: Arc<RwLock<TokenSets>>,
    /// The service and admin token files, with `[auth]`.
    files: Option<Arc<(PathBuf, PathBuf)>>,
    /// What each file held at the last reload when that differed from the
    /// tokens in use: a change is taken once two reloads in a row read it,
    /// so a file caught half rewritten (a header without its tokens) does
    /// not revoke anyone.
    seen: Arc<std::sync::Mutex<[Option<TokenDigests>; 2]>>,
}

/// The SHA-256 digests of the tokens of one file.
type TokenDigests = Vec<[u8; 32]>;

#[derive(Default, PartialEq)]
struct TokenSets {
    enabled: bool,
    service: Vec<[u8; 32]>,
    admin: Vec<[u8; 32]>,
}

/// How often [`Tokens::watch`] and [`Tls::watch`] read their files.
pub const FILES_CHECKED_EVERY: Duration = Duration::from_secs(2);

/// Warns (once, at start) when `path`, which holds `what` (a private key,
/// tokens, a secret), can be read by any user or written by its group: the
/// guides install such files 0600 or 0640.
pub fn warn_if_exposed(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "{what} is readable by every user or writable by its group; make it 0600 or 0640"
        );
    }
}

/// Shortest token accepted in a token file.
pub const TOKEN_CHARS_MIN: usize = 24;

/// A token file's tokens. A file with comments and no token is an empty
/// set: nobody holds that role, which is how the last token of a role is
/// revoked. A file with nothing in it at all is refused, as one caught
/// while it is rewritten in place would be.
fn load_tokens(path: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    if text.trim().is_empty() {
        anyhow::bail!(
            "{} is empty; to revoke every token, leave a comment line (`# revoked`)",
            path.display()
        );
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = token_part(line);
        if t.is_empty() {
            continue;
        }
        if t.contains('#') {
            anyhow::bail!(
                "{} line {}: a '#' inside a token (a comment starts a line, or follows a space)",
                path.display(),
                n + 1
            );
        }
        if t.len() < TOKEN_CHARS_MIN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!(
                "{} line {}: a token is at least {TOKEN_CHARS_MIN} printable characters",
                path.display(),
                n + 1
            );
        }
        out.push(Sha256::digest(t.as_bytes()).into());
    }
    Ok(out)
}

/// The token on a line of a token file: a `#` starts a comment at the start
/// of the line or after a space or tab. One inside a token is refused when
/// the file is read (cut there, a token would be refused to whoever holds it
/// and given to whoever knows only its start).
fn token_part(line: &str) -> &str {
    let line = line.trim();
    if line.starts_with('#') {
        return "";
    }
    match line.find([' ', '\t']) {
        Some(end) if line[end..].trim_start().starts_with('#') => &line[..end],
        _ => line,
    }
}

/// Says so in the log when a token file holds no token.
fn warn_if_empty(tokens: &[[u8; 32]], path: &Path) {
    if tokens.is_empty() {
        tracing::warn!(file = %path.display(), "token file holds no token: every call that needs its role is refused");
    }
}

fn load_sets(files: &(PathBuf, PathBuf)) -> anyhow::Result<TokenSets> {
    Ok(TokenSets {
        enabled: true,
        service: load_tokens(&files.0)?,
        admin: load_tokens(&files.1)?,
    })
}

/// What an operator's call to a node carries: an admin token and, with TLS,
/// the operator's certificate (`admin.chatstore`). The token alone is not
/// enough: routers hold the admin token file (moderation through them needs
/// it), and a router's host must not become a cluster operator.
#[derive(Clone)]
pub struct Operator {
    pub tokens: Tokens,
    pub tls: bool,
}

impl Operator {
    pub fn check<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        if self.tls {
            let certs = request.peer_certs();
            let certs = certs.as_deref().map(Vec::as_slice).unwrap_or_default();
            if !peer_is(certs, ADMIN_NAME) {
                return Err(tonic::Status::permission_denied(format!(
                    "operator calls need the operator's certificate ({ADMIN_NAME}) as well as \
                     an admin token"
                )));
            }
        }
        self.tokens.check(request.metadata(), Role::Admin)
    }
}

impl Tokens {
    /// The config's tokens; with no `[auth]`, every call is let through.
    pub fn load(config: &ClusterConfig) -> anyhow::Result<Tokens> {
        let Some(a) = &config.auth else {
            return Ok(Tokens::default());
        };
        Tokens::from_files(
            config.resolve(&a.service_tokens),
            config.resolve(&a.admin_tokens),
        )
    }

    /// The tokens in a service and an admin token file.
    pub fn from_files(service: PathBuf, admin: PathBuf) -> anyhow::Result<Tokens> {
        warn_if_exposed(&service, "a token file");
        warn_if_exposed(&admin, "a token file");
        let files = (service, admin);
        let sets = load_sets(&files)?;
        warn_if_empty(&sets.service, &files.0);
        warn_if_empty(&sets.admin, &files.1);
        Ok(Tokens {
            sets: Arc::new(RwLock::new(sets)),
            files: Some(Arc::new(files)),
            seen: Default::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.sets.read().expect("tokens lock").enabled
    }

    /// Reads the token files again and takes the tokens of each file that
    /// is valid and read the same as at the previous reload (true if they
    /// changed): a mistake in one file does not hold up a revocation in the
    /// other. A file in error keeps its tokens in use, and the error is
    /// returned.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let (service, admin) = (load_tokens(&files.0), load_tokens(&files.1));
        let mut sets = self.sets.write().expect("tokens lock");
        let mut seen = self.seen.lock().expect("token files seen");
        let mut changed = false;
        for (i, read) in [&service, &admin].into_iter().enumerate() {
            let Ok(read) = read else {
                // Two reads in a row means with no failed one between.
                seen[i] = None;
                continue;
            };
            let (in_use, path) = match i {
                0 => (&mut sets.service, &files.0),
                _ => (&mut sets.admin, &files.1),
            };
            if *in_use == *read {
                seen[i] = None;
            } else if seen[i].as_ref() == Some(read) {
                warn_if_empty(read, path);
                *in_use = read.clone();
                seen[i] = None;
                changed = true;
            } else {
                seen[i] = Some(read.clone());
            }
        }
        drop(seen);
        drop(sets);
        service?;
        admin?;
        Ok(changed)
    }

    /// Re-reads the token files every [`FILES_CHECKED_EVERY`] while
    /// any clone of these tokens lives, so tokens are added and revoked
    /// without a restart. A file that is unreadable or holds a bad line is
    /// reported and changes nothing.
    pub fn watch(&self) {
        if self.files.is_none() {
            return;
        }
        let tokens = Arc::downgrade(&self.sets);
        let files = self.files.clone();
        let seen = self.seen.clone();
        watch_files(
            "token files",
            "using their tokens now",
            "the tokens in use stay",
            move || {
                let sets = tokens.upgrade()?;
                let live = Tokens {
                    sets,
                    files: files.clone(),
                    seen: seen.clone(),
                };
                Some(live.reload())
            },
        );
    }

    /// Lets a call through if its bearer token grants `need`.
    pub fn check(&self, metadata: &MetadataMap, need: Role) -> Result<(), Status> {
        let sets = self.sets.read().expect("tokens lock");
        if !sets.enabled {
            return Ok(());
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // Every comparison runs, so timing says nothing about which matched.
        let mut is_admin = subtle::Choice::from(0);
        for t in &sets.admin {
            is_admin |= t.ct_eq(&digest);
        }
        let mut is_service = subtle::Choice::from(0);
        for t in &sets.service {
            is_service |= t.ct_eq(&digest);
        }
        match (bool::from(is_admin), bool::from(is_service), need) {
            (true, _, _) => Ok(()),
            (false, true, Role::Service) => Ok(()),
            (false, true, Role::Admin) => Err(Status::permission_denied(
                "this call needs an admin token; the token given is a service token",
            )),
            (false, false, _) => Err(Status::unauthenticated("unknown token")),
        }
    }
}

/// Adds a bearer token to every request of a client.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<BearerToken> {
        Ok(BearerToken(match token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("a token is printable ASCII")?,
            ),
            None => None,
        }))
    }

    /// The first token in a token file.
    pub fn from_file(path: &Path) -> anyhow::Result<BearerToken> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let token = text
            .lines()
            .map(token_part)
            .find(|l| !l.is_empty())
            .with_context(|| format!("{} holds no token", path.display()))?;
        BearerToken::new(Some(token))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose requests carry a bearer token.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A `#` starts a comment only at the start of a line or after a space.
    #[test]
    fn comments_never_cut_a_token() {
        assert_eq!(token_part("  # a comment"), "");
        assert_eq!(
            token_part("abcdefghijklmnopqrstuvwxyz # frontend"),
            "abcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(token_part("abc#def\tghi"), "abc#def\tghi");
        assert_eq!(
            token_part("abcdefghijkl#mnopqrstuvwxyz"),
            "abcdefghijkl#mnopqrstuvwxyz"
        );
        assert_eq!(
            token_part("abcdefghijklmnopqrstuvwxyz\t# x"),
            "abcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(token_part(""), "");
        // A file with one is refused whole, not read with the token cut.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "# header\nabcdefghijklmnopqrstuvwxyz#frontend\n").unwrap();
        let e = load_tokens(&file).unwrap_err();
        assert!(format!("{e:#}").contains("inside a token"), "{e:#}");
        std::fs::write(&file, "# header\nabcdefghijklmnopqrstuvwxyz # frontend\n").unwrap();
        assert_eq!(load_tokens(&file).unwrap().len(), 1);
    }

    fn tokens() -> Tokens {
        Tokens {
            sets: Arc::new(RwLock::new(TokenSets {
                enabled: true,
                service: vec![Sha256::digest(b"service-token-0123456789abcdef").into()],
                admin: vec![Sha256::digest(b"admin-token-0123456789abcdef").into()],
            })),
            files: None,
            seen: Default::default(),
        }
    }

    fn with(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", t.parse().unwrap());
        }
        m
    }

    #[test]
    fn tokens_grant_their_role_only() {
        let t = tokens();
        let code = |m: &MetadataMap, r| t.check(m, r).err().map(|s| s.code());
        let service = with(Some("Bearer service-token-0123456789abcdef"));
        let admin = with(Some("Bearer admin-token-0123456789abcdef"));
        assert_eq!(code(&service, Role::Service), None);
        assert_eq!(
            code(&service, Role::Admin),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(code(&admin, Role::Admin), None);
        assert_eq!(code(&admin, Role::Service), None);
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic abc"),
            Some("Bearer "),
        ] {
            assert_eq!(
                code(&with(bad), Role::Service),
                Some(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
        assert!(Tokens::default().check(&with(None), Role::Admin).is_ok());
    }

    /// A reload takes a changed file's tokens once two reloads in a row read
    /// them; a file with a bad line, or one that is gone, leaves the tokens
    /// in use as they were.
    #[test]
    fn reloads_take_valid_token_files_and_keep_the_tokens_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (service, admin) = (dir.path().join("service"), dir.path().join("admin"));
        let (old, new) = (
            "old-service-token-0123456789",
            "new-service-token-0123456789",
        );
        std::fs::write(&service, format!("{old}\n")).unwrap();
        std::fs::write(&admin, "admin-token-0123456789abcdef\n").unwrap();
        let tokens = Tokens::from_files(service.clone(), admin.clone()).unwrap();
        let ok = |t: &str| {
            tokens
                .check(&with(Some(&format!("Bearer {t}"))), Role::Service)
                .is_ok()
        };
        assert!(ok(old) && !ok(new));
        assert!(!tokens.reload().unwrap(), "nothing changed");

        // Caught half written (the header only): read once, not taken.
        std::fs::write(&service, "# rotated\n").unwrap();
        assert!(!tokens.reload().unwrap());
        assert!(ok(old), "a file read once changes nothing");
        std::fs::write(&service, format!("# rotated\n{new}\n")).unwrap();
        assert!(!tokens.reload().unwrap());
        assert!(tokens.reload().unwrap(), "read the same twice: taken");
        assert!(ok(new) && !ok(old), "the old token is revoked");

        std::fs::write(&service, "short\n").unwrap();
        assert!(tokens.reload().is_err());
        std::fs::remove_file(&admin).unwrap();
        assert!(tokens.reload().is_err());
        assert!(ok(new), "a bad or missing file changes nothing");

        // The last token of a role revoked, while the other file is broken:
        // the revocation still takes, and a restart still starts.
        std::fs::write(&service, "").unwrap();
        assert!(
            tokens.reload().is_err(),
            "an empty file is one being written"
        );
        assert!(ok(new));
        std::fs::write(&service, "# revoked\n").unwrap();
        assert!(tokens.reload().is_err(), "the admin file is still missing");
        assert!(tokens.reload().is_err());
        assert!(!ok(new), "the revoked token is refused");
        std::fs::write(&admin, "admin-token-0123456789abcdef\n").unwrap();
        assert!(Tokens::from_files(service.clone(), admin.clone()).is_ok());
    }
}
