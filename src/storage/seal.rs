//! Sealing of self-destructing message bodies at rest (crypto-shredding).
//!
//! sled never rewrites its old segments on demand: a removed or overwritten
//! value's bytes can stay in its files for as long as the segment lives. So a
//! self-destructing body is never written to disk in the clear. Wherever it is
//! stored — a Raft log entry, a message record, a snapshot file — it is
//! encrypted (XChaCha20-Poly1305) under a key that lives in a small file
//! outside sled, and destroying that key erases every copy sealed with it,
//! including the stale ones sled still holds.
//!
//! Two kinds of keys:
//! - **Epoch keys**, `keys/epoch-<n>.key`: wall-clock time is cut into epochs
//!   of a configured length and everything sealed during epoch `n` uses key
//!   `n`. The node's eraser (`crate::node::erasure`) re-seals live bodies of
//!   past epochs into the current one, has logs and snapshots that hold past
//!   epochs rebuilt, syncs, and then destroys the past keys.
//! - **Snapshot keys**, `<snapshot file>.key`: the bodies inside one snapshot
//!   file are sealed with that file's own key (epoch 0 in [`SealedBody`]), so
//!   the file can travel to another node with its key, and the key dies with
//!   the file.
//!
//! Keys are node-local. Replicas exchange plaintext (over TLS between nodes)
//! and each seals with its own keys, so ciphertexts differ between replicas
//! while the plaintext state is identical.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::api::pb::replicated::SealedBody;

pub type Key = [u8; 32];

const NONCE_BYTES: usize = 24;
/// Key file: `[u64 epoch, big-endian][32-byte key]`.
const KEY_FILE_BYTES: usize = 8 + 32;

/// `SealedBody::epoch` of a body sealed with its snapshot file's key.
pub const SNAPSHOT_EPOCH: u64 = 0;

/// A node's epoch keys, in files under one folder.
pub struct KeyRing {
    dir: PathBuf,
    epoch_ms: u64,
    keys: RwLock<BTreeMap<u64, Key>>,
    /// Highest epoch sealed with, so no epoch whose key may already be
    /// destroyed is used again.
    floor: AtomicU64,
    /// When the ring opened, by the monotonic clock, and the epoch it opened
    /// at (the one after its newest key). Epochs move on from there every
    /// `epoch_ms` of elapsed time: a step of the wall clock moves them
    /// neither ahead (which would keep every key alive until real time
    /// caught up) nor back.
    opened: (std::time::Instant, u64),
    /// Held (shared) by writers from taking a key until their sealed bytes
    /// are in sled; see [`KeyRing::hold`].
    sealers: RwLock<()>,
}

impl KeyRing {
    /// Opens (or creates) the key folder and loads its epoch keys.
    pub fn open(dir: &Path, epoch: Duration) -> io::Result<KeyRing> {
        // Made and synced into its parent: the keys must outlive a power cut.
        crate::shard::snapshot::open_dir_synced(dir)?;
        let mut keys = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // A key that was never made durable sealed nothing.
                std::fs::remove_file(entry.path())?;
                continue;
            }
            if name.starts_with("epoch-") && name.ends_with(".key") {
                let bytes = std::fs::read(entry.path())?;
                if bytes.len() == KEY_FILE_BYTES && bytes.iter().all(|b| *b == 0) {
                    // A destroy cut short between its overwrite and its
                    // removal: the key is gone already; finish it.
                    destroy_key_file(&entry.path())?;
                    continue;
                }
                let (epoch, key) = read_key_file(&entry.path())?;
                keys.insert(epoch, key);
            }
        }
        let floor = keys
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(read_floor(dir)?);
        Ok(KeyRing {
            dir: dir.to_path_buf(),
            epoch_ms: (epoch.as_millis() as u64).max(1),
            keys: RwLock::new(keys),
            floor: AtomicU64::new(floor),
            opened: (std::time::Instant::now(), floor + 1),
            sealers: RwLock::new(()),
        })
    }

    /// Held by a writer from taking the current key until what it sealed is
    /// written to sled, so that [`KeyRing::wait_for_sealers`] can tell when
    /// nothing sealed with an older epoch is still on its way in.
    pub fn hold(&self) -> RwLockReadGuard<'_, ()> {
        self.sealers.read().expect("sealers lock")
    }

    /// Returns once every writer holding [`KeyRing::hold`] has let go. Called
    /// after [`KeyRing::current_epoch`]: later writers seal with that epoch or
    /// a newer one.
    pub fn wait_for_sealers(&self) {
        drop(self.sealers.write().expect("sealers lock"));
    }

    pub fn epoch_length(&self) -> Duration {
        Duration::from_millis(self.epoch_ms)
    }

    /// The epoch that sealing uses now (never below one already used).
    pub fn current_epoch(&self) -> u64 {
        let (at, first) = self.opened;
        let by_time = first + at.elapsed().as_millis() as u64 / self.epoch_ms;
        self.floor.fetch_max(by_time, Ordering::SeqCst).max(by_time)
    }

    /// Seals `plaintext` with the current epoch's key, creating it (durably)
    /// when this is the epoch's first seal.
    pub fn seal(&self, plaintext: &[u8]) -> io::Result<SealedBody> {
        let (epoch, key) = self.current_key()?;
        Ok(seal_with(&key, epoch, plaintext))
    }

    /// The current epoch and its key, for sealing several bodies alike.
    pub fn current_key(&self) -> io::Result<(u64, Key)> {
        let epoch = self.current_epoch();
        Ok((epoch, self.key_for_sealing(epoch)?))
    }

    /// Opens a body sealed with an epoch key, or (epoch 0) with
    /// `snapshot_key`.
    pub fn unseal(&self, sealed: &SealedBody, snapshot_key: Option<&Key>) -> io::Result<Vec<u8>> {
        if sealed.epoch == SNAPSHOT_EPOCH {
            let key = snapshot_key.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "body sealed with a snapshot key outside a snapshot",
                )
            })?;
            return open_with(key, sealed);
        }
        let keys = self.keys.read().expect("key ring lock");
        let key = keys.get(&sealed.epoch).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("key of epoch {} is destroyed", sealed.epoch),
            )
        })?;
        open_with(key, sealed)
    }

    fn key_for_sealing(&self, epoch: u64) -> io::Result<Key> {
        if let Some(k) = self.keys.read().expect("key ring lock").get(&epoch) {
            return Ok(*k);
        }
        let mut keys = self.keys.write().expect("key ring lock");
        if let Some(k) = keys.get(&epoch) {
            return Ok(*k);
        }
        let key = new_key();
        write_key_file(&self.dir.join(format!("epoch-{epoch}.key")), epoch, &key)?;
        keys.insert(epoch, key);
        Ok(key)
    }

    /// Epochs whose keys still exist.
    pub fn epochs(&self) -> Vec<u64> {
        self.keys
            .read()
            .expect("key ring lock")
            .keys()
            .copied()
            .collect()
    }

    /// Destroys every epoch key below `epoch`; returns how many. The caller
    /// has made sure nothing live is sealed with them.
    pub fn destroy_before(&self, epoch: u64) -> io::Result<usize> {
        let doomed: Vec<u64> = {
            let keys = self.keys.read().expect("key ring lock");
            keys.range(..epoch).map(|(e, _)| *e).collect()
        };
        if let Some(newest) = doomed.last() {
            // Epochs never start over, even once every key is gone: a
            // snapshot key stamped with an epoch must stay older than the
            // epochs that come after it.
            write_floor(&self.dir, self.floor.load(Ordering::SeqCst).max(*newest))?;
        }
        for e in &doomed {
            destroy_key_file(&self.dir.join(format!("epoch-{e}.key")))?;
            self.keys.write().expect("key ring lock").remove(e);
        }
        Ok(doomed.len())
    }
}

pub fn new_key() -> Key {
    rand::random()
}

pub fn seal_with(key: &Key, epoch: u64, plaintext: &[u8]) -> SealedBody {
    let nonce: [u8; NONCE_BYTES] = rand::random();
    let ciphertext = XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(&nonce), plaintext)
        .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
    SealedBody {
        epoch,
        nonce: nonce.to_vec().into(),
        ciphertext: ciphertext.into(),
    }
}

pub fn open_with(key: &Key, sealed: &SealedBody) -> io::Result<Vec<u8>> {
    if sealed.nonce.len() != NONCE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "sealed body with a bad nonce",
        ));
    }
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(&sealed.nonce),
            sealed.ciphertext.as_ref(),
        )
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sealed body of epoch {} does not open with its key",
                    sealed.epoch
                ),
            )
        })
}

/// The file that keeps the newest epoch used, once keys are destroyed.
const FLOOR_FILE: &str = "epoch-floor";

/// The epoch floor recorded in `dir` (0 if none).
fn read_floor(dir: &Path) -> io::Result<u64> {
    match std::fs::read(dir.join(FLOOR_FILE)) {
        Ok(bytes) => {
            let bytes: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "epoch floor file is not 8 bytes",
                )
            })?;
            Ok(u64::from_be_bytes(bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Records `floor` in `dir`, durably (through a synced temporary file).
fn write_floor(dir: &Path, floor: u64) -> io::Result<()> {
    let path = dir.join(FLOOR_FILE);
    let tmp = dir.join(format!("{FLOOR_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&floor.to_be_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    sync_parent(&path)
}

/// Writes a key file durably: temporary file, fsync, rename, fsync folder.
pub fn write_key_file(path: &Path, epoch: u64, key: &Key) -> io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&epoch.to_be_bytes())?;
        f.write_all(key)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // The key may be on disk under the temporary name: destroyed, not
        // just unlinked.
        let _ = destroy_key_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

pub fn read_key_file(path: &Path) -> io::Result<(u64, Key)> {
    let bytes = std::fs::read(path)?;
    if bytes.len() != KEY_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("key file {} has {} bytes", path.display(), bytes.len()),
        ));
    }
    if bytes.iter().all(|b| *b == 0) {
        // Caught between the overwrite and the removal of destroy_key_file.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("key file {} is being destroyed", path.display()),
        ));
    }
    let epoch = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let key: Key = bytes[8..].try_into().expect("32 bytes");
    Ok((epoch, key))
}

/// Overwrites a key file with zeros, syncs, removes it and syncs its folder.
/// A missing file is already destroyed.
pub fn destroy_key_file(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(mut f) => {
            f.write_all(&[0u8; KEY_FILE_BYTES])?;
            f.sync_all()?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::remove_file(path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file a crash left overwritten but not removed does not stop
    /// the ring from opening: its destruction is finished.
    #[test]
    fn a_destroy_cut_short_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("epoch-7.key");
        write_key_file(&kept, 7, &new_key()).unwrap();
        let zeroed = dir.path().join("epoch-3.key");
        std::fs::write(&zeroed, [0u8; KEY_FILE_BYTES]).unwrap();
        let ring = KeyRing::open(dir.path(), Duration::from_secs(300)).unwrap();
        assert!(!zeroed.exists());
        assert!(kept.exists());
        assert_eq!(ring.current_epoch(), 8, "the epoch after the newest key");
    }

    /// Epochs move on with elapsed time, from the one after the newest key:
    /// what the wall clock says plays no part.
    #[test]
    fn epochs_follow_elapsed_time() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(dir.path(), Duration::from_millis(50)).unwrap();
        let first = ring.current_epoch();
        assert_eq!(first, 1);
        let started = std::time::Instant::now();
        while ring.current_epoch() == first {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the epoch moves on"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (epoch, _) = ring.current_key().unwrap();
        drop(ring);
        let reopened = KeyRing::open(dir.path(), Duration::from_millis(50)).unwrap();
        assert!(
            reopened.current_epoch() > epoch,
            "never an epoch already used"
        );
    }

    #[test]
    fn seal_open_and_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(dir.path(), Duration::from_secs(60)).unwrap();
        let sealed = ring.seal(b"a secret").unwrap();
        assert_ne!(sealed.ciphertext.as_ref(), b"a secret");
        assert_eq!(ring.unseal(&sealed, None).unwrap(), b"a secret");

        // Keys survive a reopen.
        let ring = KeyRing::open(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(ring.unseal(&sealed, None).unwrap(), b"a secret");

        assert_eq!(ring.destroy_before(sealed.epoch + 1).unwrap(), 1);
        let err = ring.unseal(&sealed, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [FLOOR_FILE], "no key left");
        // With every key gone, epochs still go on from the newest used.
        drop(ring);
        let ring = KeyRing::open(dir.path(), Duration::from_secs(60)).unwrap();
        assert!(ring.current_epoch() > sealed.epoch);
    }

    /// A key file caught between the overwrite and the removal of
    /// `destroy_key_file` reads as an error, not as a key of zeros.
    #[test]
    fn a_key_file_being_destroyed_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.key");
        write_key_file(&path, 3, &new_key()).unwrap();
        assert_eq!(read_key_file(&path).unwrap().0, 3);
        std::fs::write(&path, [0u8; KEY_FILE_BYTES]).unwrap();
        let e = read_key_file(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        destroy_key_file(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let key = new_key();
        let mut sealed = seal_with(&key, SNAPSHOT_EPOCH, b"body");
        assert_eq!(open_with(&key, &sealed).unwrap(), b"body");
        assert!(open_with(&new_key(), &sealed).is_err());
        let mut ct = sealed.ciphertext.to_vec();
        ct[0] ^= 1;
        sealed.ciphertext = ct.into();
        assert!(open_with(&key, &sealed).is_err());
    }
}
