//! Snapshot files: a consistent copy of a shard's state tree.
//!
//! sled iterators are not point-in-time and openraft builds snapshots while
//! apply continues, so the copy is taken when the builder is created, on the
//! state machine task, which blocks apply (DESIGN section 3). The copy goes to
//! a file, so snapshots are streamed from and to disk, never held in memory.
//!
//! Self-destructing bodies inside are sealed with the file's own key, kept
//! next to it in `<file>.key` ([`key_path`]); the key travels and dies with
//! the file.
//!
//! Format: `CSSNAP01`, then records `[u32 key_len][key][u32 value_len][value]`
//! (big-endian), then `[u32 0xFFFF_FFFF][u64 xxh3 of all preceding bytes]`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

const MAGIC: &[u8; 8] = b"CSSNAP01";
const END: u32 = 0xFFFF_FFFF;
/// Largest key or value a snapshot record may hold.
const RECORD_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Snapshot data as openraft carries it: a file on disk.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where the key of a snapshot file's sealed bodies is kept.
pub fn key_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// Writes every pair of `tree` but the apply marker to `path` and fsyncs
/// it. `transform` may replace a value on its way into the file.
pub fn write_tree(
    tree: &sled::Tree,
    path: &Path,
    mut transform: impl FnMut(&[u8], &[u8]) -> io::Result<Option<Vec<u8>>>,
) -> io::Result<u64> {
    let file = File::create(path)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Xxh3::new(),
    };
    w.write_all(MAGIC)?;
    let mut count = 0u64;
    for pair in tree.iter() {
        let (k, v) = pair.map_err(io::Error::other)?;
        // The apply marker is this replica's own bookkeeping, not state.
        if k.as_ref() == crate::storage::keys::SM_META_APPLYING {
            continue;
        }
        let replaced = transform(&k, &v)?;
        let v = replaced.as_deref().unwrap_or(&v);
        w.write_all(&(k.len() as u32).to_be_bytes())?;
        w.write_all(&k)?;
        w.write_all(&(v.len() as u32).to_be_bytes())?;
        w.write_all(v)?;
        count += 1;
    }
    w.write_all(&END.to_be_bytes())?;
    let digest = w.hash.digest();
    let mut inner = w.inner;
    inner.write_all(&digest.to_be_bytes())?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(count)
}

/// Hands every pair of a snapshot file to `each`, one at a time, then checks
/// the file's checksum. Memory stays at one record whatever the file's size;
/// a caller that must not act on a damaged file runs [`verify`] first.
pub fn for_each_pair(
    path: &Path,
    each: impl FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    walk(path, each)
}

/// Checks that a snapshot file is whole: its magic, every record, its end
/// marker and its checksum. Keeps nothing in memory.
pub fn verify(path: &Path) -> io::Result<()> {
    walk(path, |_, _| Ok(()))
}

/// Reads a snapshot file's pairs into `each`, then checks its checksum.
fn walk(path: &Path, mut each: impl FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hash = Xxh3::new();
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt(path, "bad magic"));
    }
    hash.update(&magic);
    loop {
        let klen = read_u32(&mut r, &mut hash)?;
        if klen == END {
            break;
        }
        let key = read_exact_vec(&mut r, &mut hash, klen, path)?;
        let vlen = read_u32(&mut r, &mut hash)?;
        let value = read_exact_vec(&mut r, &mut hash, vlen, path)?;
        each(key, value)?;
    }
    let mut digest = [0u8; 8];
    r.read_exact(&mut digest)?;
    if u64::from_be_bytes(digest) != hash.digest() {
        return Err(corrupt(path, "checksum mismatch"));
    }
    if r.read(&mut [0u8; 1])? != 0 {
        return Err(corrupt(path, "bytes after the checksum"));
    }
    Ok(())
}

fn read_u32(r: &mut impl Read, hash: &mut Xxh3) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    hash.update(&b);
    Ok(u32::from_be_bytes(b))
}

fn read_exact_vec(
    r: &mut impl Read,
    hash: &mut Xxh3,
    len: u32,
    path: &Path,
) -> io::Result<Vec<u8>> {
    if len > RECORD_BYTES_MAX {
        return Err(corrupt(path, "record too large"));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    hash.update(&v);
    Ok(v)
}

fn corrupt(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot {}: {what}", path.display()),
    )
}

/// Fsyncs a folder so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, and syncs each directory whose
/// entry it created (so a crash does not lose the new directory with what
/// is later synced inside it).
pub fn create_dir_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_synced(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(dir)?;
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// [`create_dir_synced`] for a folder the node keeps its state in, whose
/// parent is synced even when it exists: a process killed between making
/// it and syncing its parent left an entry that a power cut could still
/// lose with everything later synced inside. (Not for each shard's folders:
/// a start would sync their parent once per shard.)
/// A parent this process may not read (mode 0711) is only warned about:
/// the folder exists, and a node must still start.
pub fn open_dir_synced(dir: &Path) -> io::Result<()> {
    if !dir.is_dir() {
        return create_dir_synced(dir);
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Err(e) = sync_dir(parent) {
        tracing::warn!(folder = %parent.display(), error = %e,
            "cannot sync the folder holding a data folder; a power cut right after its creation could lose it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_created_with_their_parents_and_again_as_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b").join("c");
        create_dir_synced(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_synced(&deep).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(
            create_dir_synced(&file.join("d")).is_err(),
            "a file is in the way"
        );
    }

    #[test]
    fn round_trip_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        for i in 0u32..1000 {
            tree.insert(i.to_be_bytes(), vec![i as u8; (i % 50) as usize])
                .unwrap();
        }
        let path = dir.path().join("s");
        assert_eq!(write_tree(&tree, &path, |_, _| Ok(None)).unwrap(), 1000);
        let mut pairs = Vec::new();
        for_each_pair(&path, |k, v| {
            pairs.push((k, v));
            Ok(())
        })
        .unwrap();
        assert_eq!(pairs.len(), 1000);
        assert_eq!(pairs[5].0, 5u32.to_be_bytes());
        verify(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(verify(&path).is_err());
        assert!(for_each_pair(&path, |_, _| Ok(())).is_err());
        // An error of the caller's stops the walk.
        let mut seen = 0;
        let stopped = for_each_pair(&path, |_, _| {
            seen += 1;
            Err(io::Error::other("stop"))
        });
        assert!(stopped.is_err());
        assert_eq!(seen, 1);
    }
}
