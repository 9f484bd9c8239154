//! Encryption of stored secrets (SMTP passwords and OAuth2 tokens) with XChaCha20-Poly1305.
//!
//! A ciphertext is stored as `v1:<key id>:<base64(nonce || ciphertext)>`; the key id lets an
//! operator rotate keys. The tenant id and profile id are bound as associated data, so a
//! ciphertext copied to another row does not decrypt. Also the SHA-256 digests, in hex, that
//! are stored to compare with later (API token hashes, request hashes).

use std::{fmt, path::Path};

use base64::{engine::general_purpose::STANDARD, Engine};
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use rand::RngCore;

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The configured key is not 32 bytes of base64.
    #[error("encryption key must be 32 bytes, base64-encoded")]
    BadKey,
    /// The ciphertext was made with a key this process does not have.
    #[error("secret was encrypted with key {0:?}, which is not configured")]
    UnknownKey(String),
    /// The ciphertext is damaged or bound to another row.
    #[error("secret cannot be decrypted")]
    Corrupt,
    /// The development key file could not be read or written.
    #[error("development key file: {0}")]
    KeyFile(#[from] std::io::Error),
}

/// Seals and opens secrets. `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretBox {
    key_id: String,
    cipher: XChaCha20Poly1305,
    /// Retired keys by id: they open old ciphertexts but never seal.
    previous: Vec<(String, XChaCha20Poly1305)>,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBox")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SecretBox {
    /// A box from a base64 key and its id.
    pub fn new(key_b64: &str, key_id: &str) -> Result<Self, CryptoError> {
        let key_id = if key_id.is_empty() { "k1" } else { key_id };
        Ok(Self {
            key_id: key_id.to_owned(),
            cipher: cipher(key_b64)?,
            previous: Vec::new(),
        })
    }

    /// Adds a retired key that can still open what it sealed.
    pub fn with_previous(mut self, key_b64: &str, key_id: &str) -> Result<Self, CryptoError> {
        self.previous.push((key_id.to_owned(), cipher(key_b64)?));
        Ok(self)
    }

    /// The id of the key that seals.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether `sealed` was made with the current key.
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed
            .strip_prefix("v1:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.key_id)
    }

    /// The development key in `data_dir/secret.key`, created on first use. Only for local use:
    /// anyone who can read the data directory can decrypt the secrets.
    pub fn development(data_dir: &Path) -> Result<Self, CryptoError> {
        let path = data_dir.join("secret.key");
        let key = match std::fs::read_to_string(&path) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                let key = STANDARD.encode(bytes);
                write_private(&path, &key)?;
                key
            }
            Err(e) => return Err(e.into()),
        };
        Self::new(&key, "dev")
    }

    /// Encrypts `plaintext`, bound to `context` (e.g. tenant and profile id).
    pub fn seal(&self, plaintext: &str, context: &str) -> String {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plaintext.as_bytes(),
            aad: context.as_bytes(),
        };
        // Encryption with a valid key and a fresh nonce cannot fail.
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        format!("v1:{}:{}", self.key_id, STANDARD.encode(out))
    }

    /// Decrypts a value made by [`SecretBox::seal`] with the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<String, CryptoError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(key_id), Some(data)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Corrupt);
        };
        let cipher = if key_id == self.key_id {
            &self.cipher
        } else {
            self.previous
                .iter()
                .find(|(id, _)| id == key_id)
                .map(|(_, c)| c)
                .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?
        };
        let data = STANDARD.decode(data).map_err(|_| CryptoError::Corrupt)?;
        if data.len() < 24 {
            return Err(CryptoError::Corrupt);
        }
        let (nonce, ciphertext) = data.split_at(24);
        let payload = Payload {
            msg: ciphertext,
            aad: context.as_bytes(),
        };
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| CryptoError::Corrupt)?;
        String::from_utf8(plain).map_err(|_| CryptoError::Corrupt)
    }
}

fn cipher(key_b64: &str) -> Result<XChaCha20Poly1305, CryptoError> {
    let key = STANDARD
        .decode(key_b64.trim())
        .map_err(|_| CryptoError::BadKey)?;
    if key.len() != 32 {
        return Err(CryptoError::BadKey);
    }
    XChaCha20Poly1305::new_from_slice(&key).map_err(|_| CryptoError::BadKey)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let key = STANDARD.encode([7u8; 32]);
        let sb = SecretBox::new(&key, "k7").unwrap();
        let sealed = sb.seal("hunter2", "t1/p1");
        assert!(!sealed.contains("hunter2"));
        assert!(sealed.starts_with("v1:k7:"));
        assert_eq!(sb.open(&sealed, "t1/p1").unwrap(), "hunter2");
        assert!(matches!(
            sb.open(&sealed, "t2/p1"),
            Err(CryptoError::Corrupt)
        ));
        let other = SecretBox::new(&key, "k8").unwrap();
        assert!(matches!(
            other.open(&sealed, "t1/p1"),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(SecretBox::new("c2hvcnQ=", "k").is_err());
    }

    #[test]
    fn previous_keys_open_but_never_seal() {
        let old_key = STANDARD.encode([1u8; 32]);
        let new_key = STANDARD.encode([2u8; 32]);
        let old = SecretBox::new(&old_key, "old").unwrap();
        let sealed_old = old.seal("pw", "ctx");
        let rotated = SecretBox::new(&new_key, "new")
            .unwrap()
            .with_previous(&old_key, "old")
            .unwrap();
        assert_eq!(rotated.open(&sealed_old, "ctx").unwrap(), "pw");
        assert!(!rotated.is_current(&sealed_old));
        let resealed = rotated.seal("pw", "ctx");
        assert!(rotated.is_current(&resealed) && resealed.starts_with("v1:new:"));
    }
}
