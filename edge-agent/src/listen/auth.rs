//! Device credentials: PBKDF2-HMAC-SHA256 password hashes (ring) in the config, made by
//! `edge-agent passwd`. Format: `pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>`.
//!
//! A verification costs tens of milliseconds on purpose; the last password verified for each
//! user is remembered as a SHA-256 digest, so 1,000 devices sharing a user reconnecting after
//! an outage do not cost a core-minute. The memory holds one digest per configured user.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ring::{digest, pbkdf2};

/// The scheme name at the start of a hash.
pub const SCHEME: &str = "pbkdf2-sha256";
/// Iterations of new hashes (OWASP's 2023 figure for PBKDF2-HMAC-SHA256 is 600,000).
pub const ITERATIONS_DEFAULT: u32 = 600_000;
/// Fewest iterations a config may carry.
pub const ITERATIONS_MIN: u32 = 10_000;
const SALT_BYTES: usize = 16;
const HASH_BYTES: usize = 32;

/// A parsed password hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl PasswordHash {
    /// Parses the config form; the error says which part is wrong.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        let parts: Vec<&str> = s.split('$').collect();
        let [scheme, iterations, salt, hash] = parts[..] else {
            return Err(format!("expected {SCHEME}$<iterations>$<salt>$<hash> (edge-agent passwd makes one)"));
        };
        if scheme != SCHEME {
            return Err(format!("unknown scheme {scheme:?}: only {SCHEME}"));
        }
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .filter(|&n| n >= ITERATIONS_MIN)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| format!("iterations {iterations:?}: a number of at least {ITERATIONS_MIN}"))?;
        let salt = B64.decode(salt).map_err(|e| format!("salt: {e}"))?;
        let hash = B64.decode(hash).map_err(|e| format!("hash: {e}"))?;
        if salt.len() < 8 {
            return Err("salt: at least 8 bytes".into());
        }
        if hash.len() != HASH_BYTES {
            return Err(format!("hash: {} bytes, expected {HASH_BYTES}", hash.len()));
        }
        Ok(PasswordHash { iterations, salt, hash })
    }

    /// Hashes `password` with a fresh random salt.
    pub fn make(password: &str, iterations: u32) -> PasswordHash {
        let iterations = NonZeroU32::new(iterations.max(ITERATIONS_MIN)).expect("at least ITERATIONS_MIN");
        let salt: [u8; SALT_BYTES] = rand::random();
        let mut hash = vec![0; HASH_BYTES];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, password.as_bytes(), &mut hash);
        PasswordHash { iterations, salt: salt.to_vec(), hash }
    }

    /// Whether `password` matches (constant time in the hash comparison).
    pub fn verify(&self, password: &[u8]) -> bool {
        pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, self.iterations, &self.salt, password, &self.hash).is_ok()
    }
}

impl std::fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}${}${}${}", self.iterations, B64.encode(&self.salt), B64.encode(&self.hash))
    }
}

/// The configured users, with the memory of their last good password.
#[derive(Debug)]
pub struct Users {
    hashes: HashMap<String, PasswordHash>,
    publish: HashMap<String, Vec<String>>,
    verified: Mutex<HashMap<String, digest::Digest>>,
    /// One verification per user at a time: 1,000 devices of one user connecting at once
    /// wait for the first, then find its password remembered.
    verifying: HashMap<String, Mutex<()>>,
}

impl Users {
    /// From `(name, hash, publish filters)`; the config has checked every hash.
    pub fn new(users: &[super::config::UserConfig]) -> Users {
        Users {
            hashes: users
                .iter()
                .filter_map(|u| PasswordHash::parse(&u.password_hash).ok().map(|h| (u.name.clone(), h)))
                .collect(),
            publish: users.iter().filter_map(|u| u.publish.clone().map(|p| (u.name.clone(), p))).collect(),
            verified: Mutex::new(HashMap::new()),
            verifying: users.iter().map(|u| (u.name.clone(), Mutex::new(()))).collect(),
        }
    }

    /// Whether `user` exists and `password` is theirs. Slow on a cache miss: call it off the
    /// async runtime's workers.
    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        let Some(hash) = self.hashes.get(user) else { return false };
        let d = digest::digest(&digest::SHA256, password);
        let lock = |m: &Mutex<HashMap<String, digest::Digest>>| {
            m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(user).map(|v| v.as_ref().to_vec())
        };
        if lock(&self.verified).is_some_and(|v| v == d.as_ref()) {
            return true;
        }
        let _one_at_a_time =
            self.verifying.get(user).map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if lock(&self.verified).is_some_and(|v| v == d.as_ref()) {
            return true;
        }
        let ok = hash.verify(password);
        if ok {
            self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(user.to_owned(), d);
        }
        ok
    }

    /// The topic filters `user` may publish to; `None`: any.
    pub fn publish_filters(&self, user: &str) -> Option<&[String]> {
        self.publish.get(user).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_round_trips_and_verifies_only_its_password() {
        let h = PasswordHash::make("s3cret", ITERATIONS_MIN);
        let text = h.to_string();
        assert!(text.starts_with("pbkdf2-sha256$10000$"), "{text}");
        let back = PasswordHash::parse(&text).unwrap();
        assert_eq!(back, h);
        assert!(back.verify(b"s3cret"));
        assert!(!back.verify(b"s3cret "));
        assert!(!back.verify(b""));
    }

    #[test]
    fn bad_hashes_say_what_is_wrong() {
        let good = PasswordHash::make("x", ITERATIONS_MIN).to_string();
        let parts: Vec<&str> = good.split('$').collect();
        let e = |s: &str| PasswordHash::parse(s).unwrap_err();
        assert!(e("plain").contains("expected pbkdf2-sha256$"));
        assert!(e(&good.replace(SCHEME, "bcrypt")).contains("unknown scheme"));
        assert!(e(&format!("{SCHEME}$100${}${}", parts[2], parts[3])).contains("iterations"));
        assert!(e(&format!("{SCHEME}$20000$!!${}", parts[3])).starts_with("salt"));
        assert!(e(&format!("{SCHEME}$20000${}$AAAA", parts[2])).starts_with("hash: 3 bytes"));
    }

    #[test]
    fn users_check_remembers_only_good_passwords() {
        let u = super::super::config::UserConfig {
            name: "dev".into(),
            password_hash: PasswordHash::make("pw", ITERATIONS_MIN).to_string(),
            publish: Some(vec!["cdr/#".into()]),
        };
        let users = Users::new(&[u]);
        assert!(!users.check("dev", b"nope"));
        assert!(!users.check("other", b"pw"));
        assert!(users.check("dev", b"pw"));
        assert!(users.check("dev", b"pw"), "from the memory");
        assert!(!users.check("dev", b"nope"), "the memory does not let another password in");
        assert_eq!(users.publish_filters("dev"), Some(&["cdr/#".to_string()][..]));
    }
}
