//! API keys (control plane) and per-sandbox access tokens (sandbox plane).
//!
//! The key file holds one `KEY [TENANT]` per line; `#` starts a comment. A
//! key without a tenant is its own tenant (named from a hash of the key, so
//! the name is stable across reloads and reveals nothing). Keys are compared
//! as SHA-256 digests in constant time, against every entry, so neither the
//! position nor the length of a near miss shows in the timing.
//!
//! A sandbox's access token is `TENANT.HMAC-SHA256(process secret, sandbox
//! id, tenant)`: the gateway keeps no token table, a token names exactly one
//! sandbox and its tenant (so metrics can count sandbox calls per tenant
//! without a lookup), and the only way to get one is `create`/`connect` with
//! the owning tenant's key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Unreadable.
    #[error("cannot read the API key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A malformed line.
    #[error("{}:{line}: {why}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and how to write it.
        why: String,
    },
    /// No key at all.
    #[error("{} holds no key: write one `KEY [TENANT]` per line", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

struct Entry {
    digest: [u8; 32],
    tenant: String,
}

/// The accepted keys, reloadable.
pub struct Keys {
    path: Option<PathBuf>,
    entries: RwLock<Arc<Vec<Entry>>>,
}

/// Shortest key accepted (a guessable key is no key).
pub const MIN_KEY_LEN: usize = 16;

fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, KeyFileError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| KeyFileError::Line {
            path: path.to_owned(),
            line: i + 1,
            why,
        };
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or_default();
        let tenant = words.next();
        if words.next().is_some() {
            return Err(bad("expected `KEY [TENANT]`, found more words".into()));
        }
        if key.len() < MIN_KEY_LEN {
            return Err(bad(format!(
                "keys must be at least {MIN_KEY_LEN} characters (e.g. `openssl rand -hex 24`)"
            )));
        }
        let d = digest(key.as_bytes());
        let tenant = match tenant {
            Some(t) if valid_tenant(t) => t.to_owned(),
            Some(t) => return Err(bad(format!("tenant {t:?} must be 1-64 of [A-Za-z0-9._-]"))),
            None => format!("key-{}", &hex(&d)[..12]),
        };
        entries.push(Entry { digest: d, tenant });
    }
    if entries.is_empty() {
        return Err(KeyFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(entries)
}

fn load(path: &Path) -> Result<Vec<Entry>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Tenant of every caller when no key file is given.
pub const OPEN_TENANT: &str = "default";

impl Keys {
    /// Keys from `path`; `None` accepts any non-empty key as tenant
    /// [`OPEN_TENANT`] (loopback development only).
    pub fn open(path: Option<&Path>) -> Result<Keys, KeyFileError> {
        let entries = match path {
            Some(p) => load(p)?,
            None => Vec::new(),
        };
        Ok(Keys {
            path: path.map(Path::to_owned),
            entries: RwLock::new(Arc::new(entries)),
        })
    }

    /// True when keys are checked.
    pub fn enforced(&self) -> bool {
        self.path.is_some()
    }

    /// Re-reads the file; on error the old keys stay in force.
    pub fn reload(&self) -> Result<usize, KeyFileError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let fresh = load(path)?;
        let n = fresh.len();
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        Ok(n)
    }

    /// The tenant `key` belongs to, if any.
    pub fn tenant(&self, key: &str) -> Option<String> {
        if key.is_empty() {
            return None;
        }
        if !self.enforced() {
            return Some(OPEN_TENANT.to_owned());
        }
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let d = digest(key.as_bytes());
        let mut found: Option<&str> = None;
        // Every entry is compared; the match is remembered, not returned early.
        for e in entries.iter() {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(&e.tenant);
            }
        }
        found.map(str::to_owned)
    }
}

/// Mints and checks per-sandbox access tokens.
pub struct Tokens {
    secret: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

impl Tokens {
    /// A fresh secret from the kernel's CSPRNG.
    pub fn new() -> std::io::Result<Tokens> {
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(std::io::Error::other)?;
        Ok(Tokens { secret })
    }

    fn mac(&self, sandbox: &str, tenant: &str) -> String {
        // HMAC takes a key of any length: this cannot fail.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(b"forkd-gateway sandbox token\0");
        m.update(sandbox.as_bytes());
        m.update(b"\0");
        m.update(tenant.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// The token of `tenant`'s `sandbox`.
    pub fn token(&self, sandbox: &str, tenant: &str) -> String {
        format!("{tenant}.{}", self.mac(sandbox, tenant))
    }

    /// The tenant `token` was issued to for `sandbox`, if it is genuine
    /// (constant-time comparison).
    pub fn check(&self, sandbox: &str, token: &str) -> Option<String> {
        let (tenant, mac) = token.rsplit_once('.')?;
        let expected = self.mac(sandbox, tenant);
        (expected.len() == mac.len() && bool::from(expected.as_bytes().ct_eq(mac.as_bytes())))
            .then(|| tenant.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_lines_and_errors() {
        let p = Path::new("keys");
        let e = parse(
            p,
            "# comment\n0123456789abcdef0 alice\n\nfedcba9876543210f  # no tenant\n",
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].tenant, "alice");
        assert!(e[1].tenant.starts_with("key-"));
        assert!(parse(p, "short alice\n").is_err());
        assert!(parse(p, "0123456789abcdef0 bad/tenant\n").is_err());
        assert!(parse(p, "0123456789abcdef0 a b\n").is_err());
        assert!(matches!(
            parse(p, "# nothing\n"),
            Err(KeyFileError::Empty { .. })
        ));
    }

    #[test]
    fn tokens_bind_one_sandbox_and_its_tenant() {
        let t = Tokens::new().unwrap();
        let a = t.token("s-a", "alice");
        assert_eq!(t.check("s-a", &a).as_deref(), Some("alice"));
        assert_eq!(t.check("s-b", &a), None);
        assert_eq!(t.check("s-a", ""), None);
        let forged = a.replacen("alice", "bob", 1);
        assert_eq!(t.check("s-a", &forged), None, "the tenant is under the MAC");
        let other = Tokens::new().unwrap();
        assert_eq!(
            other.check("s-a", &a),
            None,
            "a restarted gateway has a new secret"
        );
    }
}
