//! Mosquitto's dynsec password hash: PBKDF2-HMAC-SHA512, 64-byte key, 12-byte
//! salt, stored with its iteration count (spec section 6.3).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::PasswordHash;
use crate::auth::constant_time_eq;

/// Salt length the plugin writes and accepts.
pub const SALT_LEN: usize = 12;
/// Derived key length.
pub const HASH_LEN: usize = 64;
/// Iterations the plugin uses for every password it sets.
pub const ITERATIONS: u32 = 101;

pub(crate) fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, &mut out);
    out
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt and 101 iterations, as the
    /// plugin does.
    pub fn new(password: &[u8]) -> PasswordHash {
        let salt: [u8; SALT_LEN] = rand::random();
        PasswordHash::with_salt(password, &salt, ITERATIONS)
    }

    /// Hashes with a given salt and iteration count (tests, known vectors).
    pub fn with_salt(password: &[u8], salt: &[u8], iterations: u32) -> PasswordHash {
        let iterations = iterations.max(1);
        PasswordHash { hash: pbkdf2(password, salt, iterations).to_vec(), salt: salt.to_vec(), iterations }
    }

    /// Constant-time check of `password` against this hash.
    pub fn verify(&self, password: &[u8]) -> bool {
        if self.iterations == 0 || self.hash.len() != HASH_LEN {
            return false;
        }
        constant_time_eq(&pbkdf2(password, &self.salt, self.iterations), &self.hash)
    }

    /// Whether it has the shape the plugin accepts (12-byte salt, 64-byte
    /// hash, at least one iteration).
    pub fn is_well_formed(&self) -> bool {
        self.salt.len() == SALT_LEN && self.hash.len() == HASH_LEN && self.iterations >= 1
    }

    /// Standard Base64 of the hash, as in `dynamic-security.json`.
    pub fn hash_b64(&self) -> String {
        STANDARD.encode(&self.hash)
    }

    /// Standard Base64 of the salt.
    pub fn salt_b64(&self) -> String {
        STANDARD.encode(&self.salt)
    }

    /// From the Base64 fields of `dynamic-security.json`; `None` unless the
    /// result is well formed.
    pub fn from_b64(hash: &str, salt: &str, iterations: i64) -> Option<PasswordHash> {
        let iterations = u32::try_from(iterations).ok()?;
        let h =
            PasswordHash { hash: STANDARD.decode(hash).ok()?, salt: STANDARD.decode(salt).ok()?, iterations };
        h.is_well_formed().then_some(h)
    }
}
