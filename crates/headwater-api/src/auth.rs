//! Bearer tokens (G12): each token has a name (what logs, metrics and the reader records show)
//! and a scope (the feeds it may read). A presented token is hashed with SHA-256 and compared
//! with the digest of every configured token in constant time, without stopping at a match, so
//! the time an answer takes says nothing about which token, or how much of one, was right.

use std::fmt;
use std::path::Path;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use headwater_core::{FeedId, FeedName};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::problem::ApiError;

/// The longest token accepted, in bytes (in a file and in a request).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// The longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// The most tokens one configuration holds (every request is compared with each).
pub const TOKENS_MAX: usize = 1024;
/// The largest token file read, in bytes.
pub const TOKEN_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// The feeds one token may read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedScope {
    /// Every feed (`"*"` in a token file).
    All,
    /// Every version of one projection (`"accounts"`).
    Name(FeedName),
    /// One feed (`"accounts.v2"`).
    Feed(FeedId),
}

impl FeedScope {
    /// Parses `*`, `accounts` or `accounts.v2`.
    pub fn parse(text: &str) -> Result<FeedScope, ConfigError> {
        if text == "*" {
            return Ok(FeedScope::All);
        }
        if text.contains('.') {
            return FeedId::parse(text)
                .map(FeedScope::Feed)
                .map_err(|e| ConfigError::Scope(e.to_string()));
        }
        FeedName::new(text)
            .map(FeedScope::Name)
            .map_err(|e| ConfigError::Scope(e.to_string()))
    }

    pub fn covers(&self, feed: &FeedId) -> bool {
        match self {
            FeedScope::All => true,
            FeedScope::Name(name) => &feed.name == name,
            FeedScope::Feed(one) => one == feed,
        }
    }
}

impl fmt::Display for FeedScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedScope::All => f.write_str("*"),
            FeedScope::Name(name) => write!(f, "{name}"),
            FeedScope::Feed(feed) => write!(f, "{feed}"),
        }
    }
}

/// Why a feed API configuration (its tokens, its source) was refused. Never quotes a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(
        "token name {0:?} must be 1 to {TOKEN_NAME_BYTES_MAX} bytes of ASCII letters, digits and `-` `_` `.`"
    )]
    Name(String),
    #[error(
        "the token named {0:?} must be 1 to {TOKEN_BYTES_MAX} bytes of visible ASCII (no spaces)"
    )]
    Token(String),
    #[error("two tokens are named {0:?}")]
    DuplicateName(String),
    #[error("the tokens named {0:?} and {1:?} are the same token")]
    DuplicateToken(String, String),
    #[error("the token named {0:?} has no feeds")]
    NoFeeds(String),
    #[error("bad feed scope: {0} (use `*`, `accounts` or `accounts.v2`)")]
    Scope(String),
    #[error("more than {TOKENS_MAX} tokens")]
    TooMany,
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {path} is larger than {TOKEN_FILE_BYTES_MAX} bytes")]
    FileTooLarge { path: String },
    #[error("the token file {path} is not valid: {detail}")]
    Parse { path: String, detail: String },
    #[error("the CloudEvents source must be 1 to {SOURCE_BYTES_MAX} bytes of visible ASCII")]
    Source,
}

/// The longest CloudEvents `source`, in bytes.
pub const SOURCE_BYTES_MAX: usize = 1024;

struct Token {
    name: String,
    digest: [u8; 32],
    scopes: Vec<FeedScope>,
}

/// The configured bearer tokens. Holds only their SHA-256 digests, never the tokens.
#[derive(Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.tokens.iter().map(|t| (&t.name, &t.scopes)))
            .finish()
    }
}

/// The reader a request was authenticated as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reader {
    /// Index into the configured tokens.
    index: usize,
    pub(crate) name: String,
}

/// What a token file's parse error says: serde_json's message only when it names a field (never a
/// value, which may be a token put in the wrong place), and the position.
fn parse_detail(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let names_a_field =
        message.starts_with("unknown field") || message.starts_with("missing field");
    let what = if names_a_field {
        message
            .split(" at line ")
            .next()
            .unwrap_or("unknown or missing field")
            .to_owned()
    } else {
        match error.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "not valid JSON".to_owned()
            }
            _ => "a value of the wrong type (see the format in docs/design/feed-api.md)".to_owned(),
        }
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= TOKEN_BYTES_MAX
        && token.bytes().all(|b| b.is_ascii_graphic())
}

impl Tokens {
    /// No token: every request that needs one is refused with 401.
    pub fn new() -> Tokens {
        Tokens::default()
    }

    /// One token that may read every feed (what `--token T` configures), named `name`.
    pub fn one_for_all(name: &str, token: &str) -> Result<Tokens, ConfigError> {
        let mut tokens = Tokens::new();
        tokens.add(name, token, vec![FeedScope::All])?;
        Ok(tokens)
    }

    /// Adds a token named `name` that may read the feeds of `scopes`.
    pub fn add(
        &mut self,
        name: &str,
        token: &str,
        scopes: Vec<FeedScope>,
    ) -> Result<(), ConfigError> {
        let name_ok = !name.is_empty()
            && name.len() <= TOKEN_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(ConfigError::Name(name.chars().take(80).collect()));
        }
        if !valid_token(token) {
            return Err(ConfigError::Token(name.to_owned()));
        }
        if scopes.is_empty() {
            return Err(ConfigError::NoFeeds(name.to_owned()));
        }
        if self.tokens.len() >= TOKENS_MAX {
            return Err(ConfigError::TooMany);
        }
        let digest = digest(token.as_bytes());
        for other in &self.tokens {
            if other.name == name {
                return Err(ConfigError::DuplicateName(name.to_owned()));
            }
            if other.digest == digest {
                return Err(ConfigError::DuplicateToken(
                    other.name.clone(),
                    name.to_owned(),
                ));
            }
        }
        self.tokens.push(Token {
            name: name.to_owned(),
            digest,
            scopes,
        });
        Ok(())
    }

    /// Reads a token file (JSON; the format is in `docs/design/feed-api.md`):
    ///
    /// ```json
    /// {"tokens": [{"name": "statements", "token": "…", "feeds": ["accounts.v2"]},
    ///             {"name": "ops", "token": "…", "feeds": ["*"]}]}
    /// ```
    pub fn from_file(path: &Path) -> Result<Tokens, ConfigError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read_error = |source| ConfigError::Read {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(TOKEN_FILE_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > TOKEN_FILE_BYTES_MAX {
            return Err(ConfigError::FileTooLarge { path: shown });
        }
        Tokens::from_json(&text).map_err(|error| match error {
            ConfigError::Parse { detail, .. } => ConfigError::Parse {
                path: shown,
                detail,
            },
            other => other,
        })
    }

    /// Parses a token file's text (see [`Tokens::from_file`]).
    pub fn from_json(text: &str) -> Result<Tokens, ConfigError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            tokens: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            name: String,
            token: String,
            feeds: Vec<String>,
        }
        let file: File = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            detail: parse_detail(&e),
        })?;
        let mut tokens = Tokens::new();
        for entry in file.tokens {
            let scopes = entry
                .feeds
                .iter()
                .map(|s| FeedScope::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            tokens.add(&entry.name, &entry.token, scopes)?;
        }
        Ok(tokens)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Finds the token of an `Authorization: Bearer …` header.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Reader, ApiError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(ApiError::unauthorized(
                "this request needs an `Authorization: Bearer <token>` header",
                false,
            ));
        };
        if values.next().is_some() {
            return Err(ApiError::unauthorized(
                "more than one Authorization header",
                true,
            ));
        }
        let malformed =
            || ApiError::unauthorized("the Authorization header is not `Bearer <token>`", true);
        let value = value.to_str().map_err(|_| malformed())?;
        let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(malformed());
        }
        let token = token.trim_matches(' ');
        if !valid_token(token) {
            return Err(malformed());
        }
        let presented = digest(token.as_bytes());
        // Every configured token is compared, whatever matched before.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, candidate) in self.tokens.iter().enumerate() {
            let equal = candidate.digest.ct_eq(&presented);
            index = u64::conditional_select(&index, &(i as u64), equal);
            found |= equal;
        }
        if !bool::from(found) {
            tracing::debug!("refused a bearer token that is not configured");
            return Err(ApiError::unauthorized(
                "the bearer token is not valid",
                true,
            ));
        }
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        let token = self
            .tokens
            .get(index)
            .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid", true))?;
        Ok(Reader {
            index,
            name: token.name.clone(),
        })
    }

    /// Whether the reader may read `feed`.
    pub(crate) fn may_read(&self, reader: &Reader, feed: &FeedId) -> bool {
        self.tokens
            .get(reader.index)
            .is_some_and(|t| t.scopes.iter().any(|s| s.covers(feed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let v2 = FeedId::parse("accounts.v2").unwrap();
        let other = FeedId::parse("loans.v2").unwrap();
        assert!(FeedScope::parse("*").unwrap().covers(&v2));
        assert!(FeedScope::parse("accounts").unwrap().covers(&v2));
        assert!(!FeedScope::parse("accounts").unwrap().covers(&other));
        assert!(FeedScope::parse("accounts.v2").unwrap().covers(&v2));
        assert!(!FeedScope::parse("accounts.v1").unwrap().covers(&v2));
        for bad in ["", "Accounts", "accounts.v0", "accounts.x", "**"] {
            assert!(FeedScope::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn token_files() {
        let tokens = Tokens::from_json(
            r#"{"tokens":[{"name":"a","token":"t1","feeds":["*"]},
                          {"name":"b","token":"t2","feeds":["accounts","loans.v1"]}]}"#,
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        for (bad, expected) in [
            (
                r#"{"tokens":[{"name":"a","token":"t","feeds":[]}]}"#,
                "no feeds",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"t","feeds":["*"],"x":1}]}"#,
                "unknown field",
            ),
            (
                r#"{"tokens":[{"name":"a b","token":"t","feeds":["*"]}]}"#,
                "token name",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"t t","feeds":["*"]}]}"#,
                "visible ASCII",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"t","feeds":["*"]},{"name":"a","token":"u","feeds":["*"]}]}"#,
                "two tokens",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"t","feeds":["*"]},{"name":"b","token":"t","feeds":["*"]}]}"#,
                "same token",
            ),
        ] {
            let error = Tokens::from_json(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn errors_never_quote_the_token() {
        let secret = "sup3r-s3cret token";
        let text = format!(r#"{{"tokens":[{{"name":"a","token":"{secret}","feeds":["*"]}}]}}"#);
        let error = Tokens::from_json(&text).unwrap_err();
        assert!(!error.to_string().contains("sup3r"));
        // A token in the wrong place is not quoted either.
        for misplaced in [
            r#"{"tokens":[{"name":"a","token":"t","feeds":"sup3r"}]}"#,
            r#"{"tokens":[{"name":"a","token":["sup3r"],"feeds":["*"]}]}"#,
            r#"{"tokens":"sup3r"}"#,
            r#"{"tokens":[{"name":"a","token":"sup3r"#,
        ] {
            let error = Tokens::from_json(misplaced).unwrap_err().to_string();
            assert!(!error.contains("sup3r"), "{error}");
            assert!(error.contains("line 1"), "{error}");
        }
        let debug = format!("{:?}", Tokens::one_for_all("a", "sup3r-s3cret").unwrap());
        assert!(!debug.contains("sup3r"), "{debug}");
    }
}
