//! The feed API's wire format, written here and nowhere else: CloudEvents 1.0 in JSON
//! (`application/cloudevents-batch+json`), feed listings and subject heads.

use headwater_core::{FeedId, Timestamp};
use headwater_store::{
    FeedEvent, FeedReader, FeedState, PublisherCursor, PublisherLag, SubjectHead,
};
use serde::Serialize;
use serde_json::value::RawValue;

/// The media type of a page of events.
pub const CLOUDEVENTS_BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// One CloudEvent as it goes on the wire. `data` is the stored JSON, embedded as it is.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: String,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a RawValue,
    sequence: u64,
    position: u64,
    feed: &'a str,
}

/// Why an event could not be written: its stored data is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("the data of event {id} (feed position {position}) is not valid JSON")]
#[non_exhaustive]
pub struct NotJson {
    /// The event's id.
    pub id: String,
    /// The event's feed position.
    pub position: u64,
}

/// One event on the wire; `feed` is the feed's id as text (`accounts.v2`).
fn cloud_event<'a>(
    source: &'a str,
    feed: &'a str,
    event: &'a FeedEvent,
) -> Result<CloudEvent<'a>, NotJson> {
    // Validates without building a value: the bytes are embedded as stored.
    let data: &RawValue = serde_json::from_slice(&event.data).map_err(|_| NotJson {
        id: event.id.to_string(),
        position: event.position.get(),
    })?;
    Ok(CloudEvent {
        specversion: "1.0",
        id: event.id.to_string(),
        source,
        event_type: event.event_type.as_str(),
        subject: event.subject.as_str(),
        time: rfc3339(event.time),
        datacontenttype: "application/json",
        data,
        sequence: event.sequence.get(),
        position: event.position.get(),
        feed,
    })
}

/// Writes a page of events as a JSON array of CloudEvents.
pub(crate) fn events_page(
    source: &str,
    feed: &FeedId,
    events: &[FeedEvent],
) -> Result<Vec<u8>, NotJson> {
    let feed = feed.to_string();
    let mut wire = Vec::with_capacity(events.len());
    let mut data_bytes = 0usize;
    for event in events {
        data_bytes += event.data.len();
        wire.push(cloud_event(source, &feed, event)?);
    }
    let mut body = Vec::with_capacity(data_bytes + events.len() * 320 + 2);
    // Serializing strings, integers and raw JSON into a Vec cannot fail.
    serde_json::to_writer(&mut body, &wire).map_err(|_| NotJson {
        id: String::new(),
        position: 0,
    })?;
    Ok(body)
}

/// One event as a CloudEvent in JSON (`application/cloudevents+json`), byte for byte the element
/// of a page the feed API serves for it: what a broker carries as the message body.
///
/// `source` is the producer's CloudEvents `source`, as the feed API is given it.
///
/// # Errors
///
/// [`NotJson`] when the event's stored data is not JSON.
pub fn cloud_event_json(
    feed: &FeedId,
    source: &str,
    event: &FeedEvent,
) -> Result<Vec<u8>, NotJson> {
    let feed = feed.to_string();
    let wire = cloud_event(source, &feed, event)?;
    let mut body = Vec::with_capacity(event.data.len() + 320);
    // Serializing strings, integers and raw JSON into a Vec cannot fail.
    serde_json::to_writer(&mut body, &wire).map_err(|_| NotJson {
        id: event.id.to_string(),
        position: event.position.get(),
    })?;
    Ok(body)
}

#[derive(Serialize)]
struct FeedEntry<'a> {
    name: &'a str,
    version: u32,
    status: &'static str,
    head: u64,
    readers: Vec<ReaderEntry<'a>>,
    publishers: Vec<PublisherEntry<'a>>,
}

#[derive(Serialize)]
struct ReaderEntry<'a> {
    reader: &'a str,
    last_read_at: String,
    reads: u64,
}

#[derive(Serialize)]
struct PublisherEntry<'a> {
    publisher: &'a str,
    cursor: u64,
    lag: u64,
    lag_seconds: f64,
    updated_at: String,
}

/// One feed of the `GET /feeds` listing, with who reads it and who publishes it.
pub(crate) struct FeedListing {
    pub(crate) state: FeedState,
    pub(crate) readers: Vec<FeedReader>,
    pub(crate) publishers: Vec<(PublisherCursor, PublisherLag)>,
}

/// `GET /feeds`: SPEC's fields (`name`, `version`, `status`, `head`), `readers`, who read the
/// feed and when last, and `publishers`, each publisher's cursor (the last position its broker
/// confirmed), its lag in positions and in seconds (since the `time` of the first event it has
/// not published; 0 when caught up) and when it last moved.
pub(crate) fn feeds_listing(feeds: &[FeedListing]) -> Vec<u8> {
    let entries: Vec<FeedEntry<'_>> = feeds
        .iter()
        .map(|feed| FeedEntry {
            name: feed.state.feed.name.as_str(),
            version: feed.state.feed.version.get(),
            status: feed.state.status.as_str(),
            head: feed.state.head.get(),
            readers: feed
                .readers
                .iter()
                .map(|r| ReaderEntry {
                    reader: &r.reader,
                    last_read_at: rfc3339(r.last_read_at),
                    reads: r.reads,
                })
                .collect(),
            publishers: feed
                .publishers
                .iter()
                .map(|(cursor, lag)| PublisherEntry {
                    publisher: &cursor.publisher,
                    cursor: cursor.position.get(),
                    lag: lag.positions,
                    lag_seconds: lag.behind.as_secs_f64(),
                    updated_at: rfc3339(cursor.updated_at),
                })
                .collect(),
        })
        .collect();
    serde_json::to_vec(&entries).unwrap_or_default()
}

#[derive(Serialize)]
struct SubjectEntry<'a> {
    subject: &'a str,
    sequence: u64,
}

/// `GET /feeds/{name}/v{version}/subjects`: `[{"subject":"42","sequence":17}]`.
pub(crate) fn subjects_page(heads: &[SubjectHead]) -> Vec<u8> {
    let entries: Vec<SubjectEntry<'_>> = heads
        .iter()
        .map(|h| SubjectEntry {
            subject: h.subject.as_str(),
            sequence: h.sequence.get(),
        })
        .collect();
    serde_json::to_vec(&entries).unwrap_or_default()
}

/// RFC 3339 in UTC with microseconds: `2026-11-27T14:06:59.123456Z`.
pub fn rfc3339(time: Timestamp) -> String {
    let micros = time.unix_micros();
    let seconds = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    let days = seconds / 86_400;
    let of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm, for
/// non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_microseconds() {
        for (micros, text) in [
            (0, "1970-01-01T00:00:00.000000Z"),
            (1, "1970-01-01T00:00:00.000001Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z"),
            (951_868_799_999_999, "2000-02-29T23:59:59.999999Z"),
            (1_798_380_419_123_456, "2026-12-27T14:06:59.123456Z"),
            (4_107_542_400_000_000, "2100-03-01T00:00:00.000000Z"),
        ] {
            assert_eq!(rfc3339(Timestamp::from_unix_micros(micros)), text);
        }
    }

    fn event(position: u64, data: &str) -> FeedEvent {
        use headwater_core::{EventId, EventType, FeedPosition, Position, Sequence, Subject};
        FeedEvent {
            position: FeedPosition(position),
            sequence: Sequence(position),
            id: EventId::new_random(),
            event_type: EventType::new("AccountOpened").unwrap(),
            subject: Subject::new("42").unwrap(),
            time: Timestamp::from_unix_micros(1_798_380_419_123_456),
            data: data.as_bytes().to_vec(),
            source_position: Position(position),
        }
    }

    #[test]
    fn one_event_is_byte_for_byte_its_element_of_a_page() {
        let feed = FeedId::parse("accounts.v2").unwrap();
        let events = [event(1, r#"{"owner": "ada"}"#), event(2, "[1, 2]")];
        let page = events_page("accounts", &feed, &events).unwrap();
        let elements: Vec<&RawValue> = serde_json::from_slice(&page).unwrap();
        assert_eq!(elements.len(), events.len());
        for (event, element) in events.iter().zip(elements) {
            let one = cloud_event_json(&feed, "accounts", event).unwrap();
            assert_eq!(std::str::from_utf8(&one).unwrap(), element.get());
        }
        let bad = event(3, "{not json");
        let err = cloud_event_json(&feed, "accounts", &bad).unwrap_err();
        assert_eq!((err.id, err.position), (bad.id.to_string(), 3));
    }
}
