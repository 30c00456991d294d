//! Snapshot files: the newest snapshot of the state machine, one file per
//! node (`<dir>/snapshot.bin`, a `raft.SnapshotFile`). Written to a temporary
//! file, fsynced, then renamed over the old one and the directory fsynced, so
//! a crash leaves either the old or the new snapshot, never a torn one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message as _;

use crate::raft::convert;
use crate::raft::pb;
use crate::raft::types::SnapshotMeta;

const FILE: &str = "snapshot.bin";
const TMP: &str = "snapshot.bin.tmp";

/// The snapshot directory of one node.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    /// Creates the directory if needed.
    pub fn open(dir: &Path) -> io::Result<SnapshotStore> {
        fs::create_dir_all(dir)?;
        Ok(SnapshotStore { dir: dir.to_path_buf() })
    }

    /// Replaces the stored snapshot (blocking: call from a blocking task).
    pub fn save(&self, meta: &SnapshotMeta, state: &Bytes) -> io::Result<()> {
        let file = pb::SnapshotFile { meta: Some(convert::snapshot_meta_to_pb(meta)), state: state.clone() };
        let tmp = self.dir.join(TMP);
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&file.encode_to_vec())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(FILE))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// The stored snapshot, if any (blocking). A file that does not decode
    /// is an error, not an absent snapshot: the log before it may be purged.
    pub fn load(&self) -> io::Result<Option<(SnapshotMeta, Bytes)>> {
        let bytes = match fs::read(self.dir.join(FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {e}"));
        let file = pb::SnapshotFile::decode(Bytes::from(bytes)).map_err(|e| bad(e.to_string()))?;
        let meta = file.meta.as_ref().ok_or_else(|| bad("no meta".into()))?;
        let meta = convert::snapshot_meta_from_pb(meta).map_err(|e| bad(e.to_string()))?;
        Ok(Some((meta, file.state)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{LeaderId, LogId, StoredMembership};
    use openraft::vote::RaftLeaderId;

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        assert!(store.load().unwrap().is_none());
        let lid = LogId::new(LeaderId::new(1, 1), 5);
        let meta = SnapshotMeta {
            last_log_id: Some(lid),
            last_membership: StoredMembership::new(Some(lid), Default::default()),
        };
        store.save(&meta, &Bytes::from_static(b"state")).unwrap();
        let (m, s) = store.load().unwrap().unwrap();
        assert_eq!(m, meta);
        assert_eq!(&s[..], b"state");
        fs::write(dir.path().join(FILE), b"\xff\xff\xff").unwrap();
        assert!(store.load().is_err());
    }
}
