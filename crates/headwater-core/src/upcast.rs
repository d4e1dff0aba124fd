//! Upcasting: reading events stored under an older schema version.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use crate::aggregate::DecodeError;

type UpcastFn = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, DecodeError> + Send + Sync>;

/// A set of upcasters, each keyed by event type and the schema version it reads. An upcaster
/// registered for (`account.opened`, 1) turns version-1 data into version-2 data; chains apply
/// one after another until no upcaster matches, then the event is decoded.
#[derive(Default)]
pub struct Upcasters {
    by_key: HashMap<(String, u32), UpcastFn>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.by_key.keys().collect();
        keys.sort();
        f.debug_struct("Upcasters").field("keys", &keys).finish()
    }
}

impl Upcasters {
    pub fn new() -> Upcasters {
        Upcasters::default()
    }

    /// Registers the upcaster from `from_version` to `from_version + 1` for `event_type`.
    ///
    /// Panics if one is already registered for that key: two upcasters for one key is a
    /// programming error.
    #[must_use]
    pub fn with(
        mut self,
        event_type: &str,
        from_version: u32,
        upcast: impl Fn(&[u8]) -> Result<Vec<u8>, DecodeError> + Send + Sync + 'static,
    ) -> Upcasters {
        assert!(from_version >= 1, "schema versions start at 1");
        let previous = self
            .by_key
            .insert((event_type.to_owned(), from_version), Box::new(upcast));
        assert!(
            previous.is_none(),
            "two upcasters for {event_type} v{from_version}"
        );
        self
    }

    /// Brings `data` of `event_type` at `schema_version` to the newest version this set knows.
    /// Returns that version and the data (borrowed when nothing applied).
    pub fn apply<'a>(
        &self,
        event_type: &str,
        schema_version: u32,
        data: &'a [u8],
    ) -> Result<(u32, Cow<'a, [u8]>), DecodeError> {
        let mut version = schema_version;
        let mut data = Cow::Borrowed(data);
        // Each step raises the version by one, so this ends after at most `by_key.len()` steps.
        while let Some(upcast) = self.by_key.get(&(event_type.to_owned(), version)) {
            data = Cow::Owned(upcast(&data)?);
            version += 1;
        }
        Ok((version, data))
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_apply_in_order_and_stop() {
        let upcasters = Upcasters::new()
            .with("t", 1, |d| Ok([d, b"+2"].concat()))
            .with("t", 2, |d| Ok([d, b"+3"].concat()))
            .with("other", 1, |_| Err(DecodeError::new("other", 1, "boom")));
        let (v, data) = upcasters.apply("t", 1, b"x").unwrap();
        assert_eq!((v, &*data), (3, &b"x+2+3"[..]));
        let (v, data) = upcasters.apply("t", 2, b"x").unwrap();
        assert_eq!((v, &*data), (3, &b"x+3"[..]));
        let (v, data) = upcasters.apply("t", 3, b"x").unwrap();
        assert!(matches!(data, Cow::Borrowed(_)));
        assert_eq!(v, 3);
        assert!(upcasters.apply("other", 1, b"x").is_err());
    }
}
