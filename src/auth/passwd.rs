//! Mosquitto `mosquitto_passwd` password files and password hashes.
//!
//! A file holds one `user:hash` per line; blank lines and lines starting with `#`
//! are skipped. Two hash forms are understood, as written by Mosquitto:
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512, 64-byte key
//!   (Mosquitto 2's default, 101 iterations, 12-byte salt);
//! - `$6$<base64 salt>$<base64 hash>`: SHA-512(password || salt) (Mosquitto 1.x).
//!
//! Base64 is the standard alphabet with padding. Comparisons are constant-time.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha512};

use super::AuthError;

/// Iterations Mosquitto 2 uses for every password it hashes.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 101;
/// Salt length Mosquitto uses, in bytes.
pub const SALT_LEN: usize = 12;
const PBKDF2_KEY_LEN: usize = 64;

/// One parsed password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$6$`: SHA-512 over the password followed by the salt.
    Sha512 { salt: Vec<u8>, hash: [u8; 64] },
    /// `$7$`: PBKDF2-HMAC-SHA512 with a 64-byte derived key.
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: [u8; 64] },
}

impl fmt::Debug for PasswordHash {
    // Never print hash material into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Sha512 { .. } => f.write_str("PasswordHash::Sha512(..)"),
            PasswordHash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "PasswordHash::Pbkdf2Sha512(iterations={iterations}, ..)")
            }
        }
    }
}

impl PasswordHash {
    /// Parses the hash part of a password file line (`$6$...` or `$7$...`).
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        let Some(rest) = s.strip_prefix('$') else {
            return Err("password is not hashed (expected $6$ or $7$; run mosquitto_passwd -U)".into());
        };
        let fields: Vec<&str> = rest.split('$').collect();
        match fields.as_slice() {
            ["6", salt, hash] => {
                Ok(PasswordHash::Sha512 { salt: decode_salt(salt)?, hash: decode_hash(hash)? })
            }
            ["7", iterations, salt, hash] => {
                let iterations: u32 =
                    iterations.parse().map_err(|_| format!("bad iteration count {iterations:?}"))?;
                if iterations == 0 {
                    return Err("iteration count must be at least 1".into());
                }
                Ok(PasswordHash::Pbkdf2Sha512 {
                    iterations,
                    salt: decode_salt(salt)?,
                    hash: decode_hash(hash)?,
                })
            }
            [kind, ..] if *kind == "6" || *kind == "7" => {
                Err(format!("malformed ${kind}$ hash (wrong number of '$' fields)"))
            }
            [kind, ..] => Err(format!("unsupported hash type ${kind}$ (expected $6$ or $7$)")),
            [] => Err("empty hash".into()),
        }
    }

    /// Checks `password` against this hash in constant time (for a given hash).
    pub fn verify(&self, password: &[u8]) -> bool {
        let computed = match self {
            PasswordHash::Sha512 { salt, .. } => sha512_salted(password, salt),
            PasswordHash::Pbkdf2Sha512 { iterations, salt, .. } => pbkdf2_sha512(password, salt, *iterations),
        };
        let stored = match self {
            PasswordHash::Sha512 { hash, .. } | PasswordHash::Pbkdf2Sha512 { hash, .. } => hash,
        };
        constant_time_eq(&computed, stored)
    }

    /// A new `$7$` hash of `password` with a fresh random salt.
    pub fn new_pbkdf2(password: &[u8], iterations: u32) -> PasswordHash {
        let iterations = iterations.max(1);
        let salt: [u8; SALT_LEN] = rand::random();
        let hash = pbkdf2_sha512(password, &salt, iterations);
        PasswordHash::Pbkdf2Sha512 { iterations, salt: salt.to_vec(), hash }
    }
}

impl fmt::Display for PasswordHash {
    /// The Mosquitto encoding (`$6$...` / `$7$...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Sha512 { salt, hash } => write!(f, "$6${}${}", B64.encode(salt), B64.encode(hash)),
            PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => {
                write!(f, "$7${iterations}${}${}", B64.encode(salt), B64.encode(hash))
            }
        }
    }
}

/// Hashes `password` in Mosquitto 2's `$7$` form (PBKDF2-HMAC-SHA512, 12-byte random
/// salt, 64-byte key). `iterations` of 0 is raised to 1. Mosquitto uses
/// [`DEFAULT_PBKDF2_ITERATIONS`].
pub fn hash_password_pbkdf2(password: &[u8], iterations: u32) -> String {
    PasswordHash::new_pbkdf2(password, iterations).to_string()
}

/// A loaded password file: user name -> hash.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, PasswordHash>,
    /// Verified against when the user is unknown, so that the time taken does not
    /// tell whether a user name exists.
    dummy: Option<PasswordHash>,
}

impl PasswordFile {
    /// Reads and parses the file at `path`; any bad line refuses the whole file.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
        PasswordFile::parse(&text).map_err(|(line, reason)| AuthError::BadLine {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses the text of a password file. The error carries the 1-based line number.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((line_no, "expected user:hash".into()));
            };
            if user.is_empty() {
                return Err((line_no, "empty user name".into()));
            }
            if hash.is_empty() {
                return Err((line_no, format!("missing password hash for user {user:?}")));
            }
            let parsed = PasswordHash::parse(hash).map_err(|reason| (line_no, reason))?;
            if users.insert(user.to_owned(), parsed).is_some() {
                return Err((line_no, format!("duplicate user {user:?}")));
            }
        }
        let dummy = users.values().next().map(|h| match h {
            PasswordHash::Sha512 { .. } => PasswordHash::Sha512 { salt: vec![0; SALT_LEN], hash: [0; 64] },
            PasswordHash::Pbkdf2Sha512 { iterations, .. } => {
                PasswordHash::Pbkdf2Sha512 { iterations: *iterations, salt: vec![0; SALT_LEN], hash: [0; 64] }
            }
        });
        Ok(PasswordFile { users, dummy })
    }

    /// True when `user` exists and `password` matches its hash.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(dummy) = &self.dummy {
                    // Result ignored on purpose: only the work matters.
                    let _ = std::hint::black_box(dummy.verify(password));
                }
                false
            }
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn decode_salt(s: &str) -> Result<Vec<u8>, String> {
    let salt = B64.decode(s).map_err(|e| format!("salt is not valid base64: {e}"))?;
    if salt.is_empty() {
        return Err("empty salt".into());
    }
    Ok(salt)
}

fn decode_hash(s: &str) -> Result<[u8; 64], String> {
    let bytes = B64.decode(s).map_err(|e| format!("hash is not valid base64: {e}"))?;
    <[u8; 64]>::try_from(bytes.as_slice())
        .map_err(|_| format!("hash must decode to 64 bytes, got {}", bytes.len()))
}

fn sha512_salted(password: &[u8], salt: &[u8]) -> [u8; 64] {
    let mut hasher = Sha512::new();
    hasher.update(password);
    hasher.update(salt);
    hasher.finalize().into()
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; PBKDF2_KEY_LEN] {
    let mut out = [0u8; PBKDF2_KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

/// Compares secrets without an early exit (only the lengths may leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}
