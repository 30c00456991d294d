//! The backup file: a tar.gz whose first entry is `manifest.pb` (a
//! `backup.Manifest`), then the parts, each a run of length-delimited
//! protobuf records (proto/backup.proto). Written and read as streams: parts
//! are first written to temporary files next to the archive (their size and
//! SHA-256 must be known for the tar headers and the manifest), then copied
//! into the archive; a reader holds one record at a time.
//!
//! [`validate`] reads a whole file and refuses, with an error saying what is
//! wrong: a file that is not gzip (wrong magic), a tar.gz that is not a raftmq
//! backup (foreign), a newer format version, an entry whose path is not a
//! plain file name (path traversal), a truncated file, a part whose SHA-256,
//! size or record count differs from the manifest, a record that does not
//! decode. Older format versions are read.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use prost::Message as _;
use sha2::{Digest, Sha256};

use super::pb;
use crate::state::pb as spb;

/// `Manifest.magic` of every raftmq backup.
pub const MAGIC: &str = "raftmq-backup";
/// The format this version writes; it reads every version up to this one.
pub const FORMAT_VERSION: u32 = 1;
/// The first entry of the archive.
pub const MANIFEST: &str = "manifest.pb";
/// `SessionState` records (with subscriptions, queues incl. shared-group
/// copies, in-flight messages, pending wills).
pub const PART_SESSIONS: &str = "sessions.pbd";
/// `RetainedMessage` records.
pub const PART_RETAINED: &str = "retained.pbd";
/// One `ClusterSettings` record (mode, pinned leader; never the job lock).
pub const PART_CLUSTER: &str = "cluster.pbd";
/// One `EffectiveConfig` record.
pub const PART_CONFIG: &str = "config.pbd";
/// Extension point: one record, the encoded `raftmq.dynsec.DynsecState`.
/// Absent part = no dynamic-security state in the backup.
pub const PART_DYNSEC: &str = "dynsec.pbd";
/// Every part name this version knows.
pub const KNOWN_PARTS: &[&str] = &[PART_SESSIONS, PART_RETAINED, PART_CLUSTER, PART_CONFIG, PART_DYNSEC];

/// Largest record accepted (one log entry's worth).
pub const MAX_RECORD: usize = crate::raft::MAX_ENTRY_BYTES;
const MAX_MANIFEST: u64 = 1024 * 1024;

#[derive(thiserror::Error, Debug)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("not a gzip file (wrong magic bytes): not a raftmq backup")]
    NotGzip,
    #[error("the file is truncated ({0})")]
    Truncated(String),
    #[error("the file is corrupt: {0}")]
    Corrupt(String),
    #[error("not a raftmq backup: {0}")]
    Foreign(String),
    #[error(
        "backup format version {found} is newer than this raftmq reads (up to {supported}); upgrade raftmq"
    )]
    NewerVersion { found: u32, supported: u32 },
    #[error("unsafe entry path in the archive: {0:?} (path traversal refused)")]
    UnsafePath(String),
    #[error("checksum mismatch in part {part}: manifest says {expected}, the data hashes to {found}")]
    Checksum { part: String, expected: String, found: String },
}

/// Maps a read error of the gzip/tar stream to what it means.
fn read_err(path: &Path, e: io::Error) -> FormatError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => FormatError::Truncated(e.to_string()),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::Other => {
            FormatError::Corrupt(e.to_string())
        }
        _ => FormatError::Io { path: path.display().to_string(), source: e },
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.display().to_string(), source }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------ writing

/// One part being written to a temporary file.
pub struct PartWriter {
    name: &'static str,
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    records: u64,
    bytes: u64,
}

impl PartWriter {
    pub fn create(dir: &Path, name: &'static str) -> Result<PartWriter, FormatError> {
        let path = dir.join(name);
        let out = BufWriter::new(File::create(&path).map_err(io_err(&path))?);
        Ok(PartWriter { name, path, out, hash: Sha256::new(), records: 0, bytes: 0 })
    }

    /// Appends one record given as its encoded bytes.
    pub fn raw(&mut self, record: &[u8]) -> Result<(), FormatError> {
        let mut len = Vec::with_capacity(10);
        prost::encoding::encode_varint(record.len() as u64, &mut len);
        for chunk in [&len[..], record] {
            self.out.write_all(chunk).map_err(io_err(&self.path))?;
            self.hash.update(chunk);
            self.bytes += chunk.len() as u64;
        }
        self.records += 1;
        Ok(())
    }

    pub fn record<M: prost::Message>(&mut self, m: &M) -> Result<(), FormatError> {
        self.raw(&m.encode_to_vec())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Flushes; returns the manifest entry and the file.
    pub fn finish(mut self) -> Result<(pb::Part, PathBuf), FormatError> {
        self.out.flush().map_err(io_err(&self.path))?;
        let part = pb::Part {
            name: self.name.to_string(),
            records: self.records,
            bytes: self.bytes,
            sha256: hex(&self.hash.finalize()),
        };
        Ok((part, self.path))
    }
}

/// Writes the archive at `out` (via `out.partial`, renamed when complete):
/// the manifest, then the part files in the manifest's order.
pub fn write_archive(out: &Path, manifest: &pb::Manifest, files: &[PathBuf]) -> Result<u64, FormatError> {
    let partial = out.with_extension("gz.partial");
    let result = (|| {
        let file = File::create(&partial).map_err(io_err(&partial))?;
        let gz = GzEncoder::new(BufWriter::new(file), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let mtime = manifest.created_at_ms / 1000;
        let bytes = manifest.encode_to_vec();
        tar.append(&header(bytes.len() as u64, mtime), &bytes[..]).map_err(io_err(&partial))?;
        for (part, path) in manifest.parts.iter().zip(files) {
            let f = File::open(path).map_err(io_err(path))?;
            let mut h = header(part.bytes, mtime);
            h.set_path(&part.name).map_err(io_err(path))?;
            h.set_cksum();
            tar.append(&h, BufReader::new(f)).map_err(io_err(&partial))?;
        }
        let gz = tar.into_inner().map_err(io_err(&partial))?;
        let file = gz.finish().map_err(io_err(&partial))?;
        let file = file.into_inner().map_err(|e| io_err(&partial)(e.into_error()))?;
        file.sync_all().map_err(io_err(&partial))?;
        Ok::<(), FormatError>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(io_err(out))?;
    Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    // Only the manifest keeps this name; parts set theirs.
    let _ = h.set_path(MANIFEST);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

// ------------------------------------------------------------ reading

/// Reads length-delimited records from a part.
pub struct RecordReader<R: Read> {
    inner: R,
}

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R) -> RecordReader<R> {
        RecordReader { inner }
    }

    /// The next record; None at the end of the part.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, io::Error> {
        let mut len: u64 = 0;
        for i in 0..10 {
            let mut b = [0u8; 1];
            if self.inner.read(&mut b)? == 0 {
                if i == 0 {
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "record length cut short"));
            }
            len |= u64::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                let len = usize::try_from(len).ok().filter(|l| *l <= MAX_RECORD).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("record of {len} bytes is too large"))
                })?;
                let mut buf = vec![0u8; len];
                self.inner.read_exact(&mut buf)?;
                return Ok(Some(buf));
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "record length varint too long"))
    }
}

/// Hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn check_entry_path(raw: &[u8]) -> Result<String, FormatError> {
    let name = String::from_utf8_lossy(raw).to_string();
    let plain = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if !plain || name.contains("..") {
        return Err(FormatError::UnsafePath(name));
    }
    Ok(name)
}

fn open_gz(path: &Path) -> Result<tar::Archive<GzDecoder<BufReader<File>>>, FormatError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io_err(path))?;
    if n < 2 || magic != [0x1f, 0x8b] {
        return Err(FormatError::NotGzip);
    }
    drop(f);
    let f = File::open(path).map_err(io_err(path))?;
    Ok(tar::Archive::new(GzDecoder::new(BufReader::new(f))))
}

fn check_manifest(m: &pb::Manifest) -> Result<(), FormatError> {
    if m.magic != MAGIC {
        return Err(FormatError::Foreign(format!("manifest magic is {:?}, expected {MAGIC:?}", m.magic)));
    }
    if m.format_version > FORMAT_VERSION {
        return Err(FormatError::NewerVersion { found: m.format_version, supported: FORMAT_VERSION });
    }
    if m.format_version == 0 {
        return Err(FormatError::Corrupt("manifest has no format version".into()));
    }
    Ok(())
}

fn read_manifest_entry<R: Read>(
    path: &Path,
    entry: &mut tar::Entry<'_, R>,
) -> Result<pb::Manifest, FormatError> {
    let name = check_entry_path(&entry.path_bytes())?;
    if name != MANIFEST {
        return Err(FormatError::Foreign(format!("first entry is {name:?}, not {MANIFEST}")));
    }
    if entry.header().entry_type() != tar::EntryType::Regular || entry.size() > MAX_MANIFEST {
        return Err(FormatError::Foreign("the manifest entry is not a small regular file".into()));
    }
    let mut buf = Vec::new();
    entry.read_to_end(&mut buf).map_err(|e| read_err(path, e))?;
    let m = pb::Manifest::decode(&buf[..])
        .map_err(|e| FormatError::Foreign(format!("the manifest does not decode: {e}")))?;
    check_manifest(&m)?;
    Ok(m)
}

/// Reads only the manifest (cheap: the first entry).
pub fn read_manifest(path: &Path) -> Result<pb::Manifest, FormatError> {
    let mut ar = open_gz(path)?;
    let mut entries = ar.entries().map_err(|e| read_err(path, e))?;
    let mut first = match entries.next() {
        Some(e) => e.map_err(|e| read_err(path, e))?,
        None => return Err(FormatError::Foreign("the archive is empty".into())),
    };
    read_manifest_entry(path, &mut first)
}

/// Checks that a record of part `name` decodes as what the part holds.
fn check_record(name: &str, rec: &[u8]) -> Result<(), String> {
    let r = match name {
        PART_SESSIONS => spb::SessionState::decode(rec).map(|_| ()),
        PART_RETAINED => spb::RetainedMessage::decode(rec).map(|_| ()),
        PART_CLUSTER => spb::ClusterSettings::decode(rec).map(|_| ()),
        PART_CONFIG => pb::EffectiveConfig::decode(rec).map(|_| ()),
        PART_DYNSEC => crate::dynsec::pb::DynsecState::decode(rec).map(|_| ()),
        _ => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

/// What a reader gets for each part, after the manifest was checked.
pub trait PartVisitor {
    /// Called per record of part `name`, in order.
    fn record(&mut self, name: &str, rec: Vec<u8>) -> Result<(), FormatError>;
}

/// Reads the whole file: manifest, every part (hashes, sizes, counts,
/// record decoding), the gzip trailer. `visit` sees the records as they are
/// read; for a validation pass use [`validate`] (nothing is visited).
pub fn read_all(path: &Path, mut visit: Option<&mut dyn PartVisitor>) -> Result<pb::Manifest, FormatError> {
    let mut ar = open_gz(path)?;
    let mut entries = ar.entries().map_err(|e| read_err(path, e))?;
    let mut first = match entries.next() {
        Some(e) => e.map_err(|e| read_err(path, e))?,
        None => return Err(FormatError::Foreign("the archive is empty".into())),
    };
    let manifest = read_manifest_entry(path, &mut first)?;
    drop(first);
    let mut seen: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| read_err(path, e))?;
        let name = check_entry_path(&entry.path_bytes())?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(FormatError::UnsafePath(format!("{name} (not a regular file)")));
        }
        let part =
            manifest.parts.iter().find(|p| p.name == name).ok_or_else(|| {
                FormatError::Corrupt(format!("entry {name:?} is not listed in the manifest"))
            })?;
        if seen.contains(&name) {
            return Err(FormatError::Corrupt(format!("entry {name:?} appears twice")));
        }
        let mut reader = RecordReader::new(HashingReader { inner: entry, hash: Sha256::new(), bytes: 0 });
        let mut records = 0u64;
        while let Some(rec) = reader.next_record().map_err(|e| read_err(path, e))? {
            check_record(&name, &rec)
                .map_err(|e| FormatError::Corrupt(format!("part {name}: record {records}: {e}")))?;
            records += 1;
            if let Some(v) = visit.as_deref_mut() {
                v.record(&name, rec)?;
            }
        }
        let h = reader.inner;
        let found = hex(&h.hash.finalize());
        if found != part.sha256 {
            return Err(FormatError::Checksum { part: name, expected: part.sha256.clone(), found });
        }
        if h.bytes != part.bytes || records != part.records {
            return Err(FormatError::Corrupt(format!(
                "part {name}: {} bytes / {records} records, manifest says {} / {}",
                h.bytes, part.bytes, part.records
            )));
        }
        seen.push(name);
    }
    for p in &manifest.parts {
        if !seen.contains(&p.name) {
            return Err(FormatError::Truncated(format!("part {} is missing", p.name)));
        }
    }
    // Read to the end so the gzip trailer (CRC, length) is checked too.
    let mut rest = ar.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| read_err(path, e))?;
    Ok(manifest)
}

/// Validates the whole file without changing anything; returns its manifest.
pub fn validate(path: &Path) -> Result<pb::Manifest, FormatError> {
    read_all(path, None)
}

#[cfg(test)]
#[path = "format_tests.rs"]
pub(crate) mod tests;
