//! `state_dir`: the only place berth writes to disk. It holds the ACME account and
//! certificates, never a secret from SSM. The directory is 0700 and private files 0600, so
//! only root (berth's user) can read them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Creates `dir` (0700) if missing, and tightens it if it is looser.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state_dir {}", dir.display()))?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting state_dir {} to 0700", dir.display()))?;
    }
    Ok(())
}

/// Writes a private file (0600) atomically: a crash never leaves half a key behind.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Writes a file that holds nothing secret (a certificate) atomically, 0644.
pub fn write_public(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, data, 0o644)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A random key, created once per instance, that makes the `berth.config-hash` label a
/// keyed digest: the label must change when a secret does, yet must not let someone who
/// can `docker inspect` test guesses of a short secret offline.
pub fn hash_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("config-hash.key");
    match fs::read(&path) {
        Ok(k) if k.len() == 32 => Ok(k),
        _ => {
            let mut key = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            write_private(&path, &key)?;
            Ok(key)
        }
    }
}
