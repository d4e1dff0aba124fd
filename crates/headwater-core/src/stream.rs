//! Stream names: `category-id`.

use std::fmt;

use crate::limits::{CATEGORY_BYTES_MAX, STREAM_NAME_BYTES_MAX};

/// The name of a stream: `category-id`, e.g. `account-42`.
///
/// - The **category** is everything before the first `-`: 1 to [`CATEGORY_BYTES_MAX`] bytes of
///   ASCII letters, digits and `_`, starting with a letter.
/// - The **id** is everything after it: at least one byte of ASCII letters, digits and
///   `-` `_` `.` `~` (the URL "unreserved" set, so an id is a valid URL path segment and a valid
///   feed subject without escaping).
/// - The whole name is at most [`STREAM_NAME_BYTES_MAX`] bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamName {
    name: String,
    /// Byte index of the first `-`.
    split: usize,
}

/// Why a stream name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamNameError {
    #[error("stream name is {len} bytes, more than the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("stream name {0:?} has no `-` between category and id (expected `category-id`)")]
    NoSeparator(String),
    #[error("stream name {0:?} has an empty category")]
    EmptyCategory(String),
    #[error("stream name {0:?} has an empty id")]
    EmptyId(String),
    #[error("category of stream name {name:?} is longer than {max} bytes")]
    CategoryTooLong { name: String, max: usize },
    #[error(
        "category of stream name {0:?} must start with an ASCII letter and hold only ASCII letters, digits and `_`"
    )]
    InvalidCategory(String),
    #[error("id of stream name {0:?} may hold only ASCII letters, digits and `-` `_` `.` `~`")]
    InvalidId(String),
}

fn is_category_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `b` may appear in a stream id (and so in a feed subject).
pub(crate) fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

impl StreamName {
    /// Validates and builds a stream name.
    pub fn new(name: impl Into<String>) -> Result<StreamName, StreamNameError> {
        let name = name.into();
        // Checked first so that every later message quotes a bounded string.
        if name.len() > STREAM_NAME_BYTES_MAX {
            return Err(StreamNameError::TooLong {
                len: name.len(),
                max: STREAM_NAME_BYTES_MAX,
            });
        }
        let Some(split) = name.find('-') else {
            return Err(StreamNameError::NoSeparator(name));
        };
        let (category, id) = (&name[..split], &name[split + 1..]);
        if category.is_empty() {
            return Err(StreamNameError::EmptyCategory(name));
        }
        if id.is_empty() {
            return Err(StreamNameError::EmptyId(name));
        }
        if category.len() > CATEGORY_BYTES_MAX {
            return Err(StreamNameError::CategoryTooLong {
                name,
                max: CATEGORY_BYTES_MAX,
            });
        }
        let category_ok =
            category.as_bytes()[0].is_ascii_alphabetic() && category.bytes().all(is_category_byte);
        if !category_ok {
            return Err(StreamNameError::InvalidCategory(name));
        }
        if !id.bytes().all(is_id_byte) {
            return Err(StreamNameError::InvalidId(name));
        }
        Ok(StreamName { name, split })
    }

    /// Builds `category-id` from its two parts, validating both.
    pub fn from_parts(category: &str, id: &str) -> Result<StreamName, StreamNameError> {
        StreamName::new(format!("{category}-{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The part before the first `-` (`account` in `account-42`).
    pub fn category(&self) -> &str {
        &self.name[..self.split]
    }

    /// The part after the first `-` (`42` in `account-42`).
    pub fn id(&self) -> &str {
        &self.name[self.split + 1..]
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamName({:?})", self.name)
    }
}

impl std::str::FromStr for StreamName {
    type Err = StreamNameError;

    fn from_str(s: &str) -> Result<StreamName, StreamNameError> {
        StreamName::new(s)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for (name, category, id) in [
            ("account-42", "account", "42"),
            ("a-b", "a", "b"),
            ("Order_Line-2024-01-05.x~y", "Order_Line", "2024-01-05.x~y"),
            ("account-a-b", "account", "a-b"),
        ] {
            let stream = StreamName::new(name).unwrap();
            assert_eq!((stream.category(), stream.id()), (category, id), "{name}");
            assert_eq!(stream.as_str(), name);
        }
    }

    #[test]
    fn invalid_names() {
        let long = format!("a-{}", "x".repeat(STREAM_NAME_BYTES_MAX));
        let long_category = format!("{}-1", "c".repeat(CATEGORY_BYTES_MAX + 1));
        type Case<'a> = (&'a str, fn(&StreamNameError) -> bool);
        let table: &[Case<'_>] = &[
            ("", |e| matches!(e, StreamNameError::NoSeparator(_))),
            ("account", |e| matches!(e, StreamNameError::NoSeparator(_))),
            ("-42", |e| matches!(e, StreamNameError::EmptyCategory(_))),
            ("account-", |e| matches!(e, StreamNameError::EmptyId(_))),
            ("1account-1", |e| {
                matches!(e, StreamNameError::InvalidCategory(_))
            }),
            ("acc ount-1", |e| {
                matches!(e, StreamNameError::InvalidCategory(_))
            }),
            ("account-4 2", |e| {
                matches!(e, StreamNameError::InvalidId(_))
            }),
            ("account-4/2", |e| {
                matches!(e, StreamNameError::InvalidId(_))
            }),
            ("account-é", |e| matches!(e, StreamNameError::InvalidId(_))),
            ("account-a\0", |e| {
                matches!(e, StreamNameError::InvalidId(_))
            }),
            (&long, |e| matches!(e, StreamNameError::TooLong { .. })),
            (&long_category, |e| {
                matches!(e, StreamNameError::CategoryTooLong { .. })
            }),
        ];
        for (name, is_expected) in table {
            let err = StreamName::new(*name).unwrap_err();
            assert!(is_expected(&err), "{name:?} gave {err:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_accepts_only_the_documented_charset(name in "\\PC{0,80}") {
            if let Ok(stream) = StreamName::new(name.clone()) {
                proptest::prop_assert!(stream.as_str().is_ascii());
                proptest::prop_assert_eq!(format!("{}-{}", stream.category(), stream.id()), name);
            }
        }
    }
}
